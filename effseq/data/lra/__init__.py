"""Long Range Arena tasks (Tay et al. 2021) read from the official release's files."""
