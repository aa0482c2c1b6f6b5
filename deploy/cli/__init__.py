"""The `gptoss` command line."""
