"""The `lesionml` command: the application layer on top of flows/, tasks/ and the library."""
