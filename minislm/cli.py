"""What the command-line tools share: an argument parser whose usage errors are one line."""
import argparse


class Parser(argparse.ArgumentParser):
    """argparse with a usage error in one line (argparse's own prints the whole usage first)."""

    def error(self, message):
        self.exit(2, f"error: {message}; see `{self.prog} --help`\n")
