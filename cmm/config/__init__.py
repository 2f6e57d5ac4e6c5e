"""The user's files: where they live (every file name once), .env, mappings, careful text-file edits."""
