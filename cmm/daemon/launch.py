"""The one Python line that runs ``twistd``, for whoever starts ``twistd cmm`` without a twistd script.

The plugin that ships beside the imported ``cmm`` goes first among Twisted's plugins: another
copy's ``cmm_plugin`` (an older install, a checkout) would otherwise name modules this ``cmm``
does not have.  Imports nothing heavy, so ``cmm`` commands can use it.
"""

from __future__ import annotations

TWISTD_CODE = (
    "import sys, pathlib, cmm, twisted.plugins; "
    "twisted.plugins.__path__.insert(0, str(pathlib.Path(cmm.__file__).parents[1] / 'twisted' / 'plugins')); "
    "sys.argv[0] = 'twistd'; from twisted.scripts.twistd import run; run()"
)
