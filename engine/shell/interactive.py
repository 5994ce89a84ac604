"""Interactive mode: a prompt with readline history (kept in a file) and tab completion of
command names and of each command's options."""

from __future__ import annotations

import cmd
import os

from .commands import Command, Session, run_command_line

HISTORY_FILE_DEFAULT = os.path.expanduser("~/.engine_shell_history")
HISTORY_LINES_MAX = 1_000
EXIT_WORDS = ("exit", "quit")


class InteractiveShell(cmd.Cmd):
    """`engine>` prompt; every line goes through `run_command_line`, as in scripted mode."""

    intro = "engine admin shell: `help` lists the commands, `exit` or Ctrl-D leaves, Tab completes."
    prompt = "engine> "

    def __init__(self, session: Session, commands: dict[str, Command]):
        super().__init__()
        self.session = session
        self.commands = commands
        self.last_status = 0

    def onecmd(self, line: str) -> bool:
        line = line.strip()
        if line == "EOF" or line in EXIT_WORDS:
            return True
        self.last_status = run_command_line(self.session, self.commands, line)
        return False

    def emptyline(self) -> bool:
        return False  # cmd's default repeats the last command: not for commands that write

    def completenames(self, text: str, *ignored: object) -> list[str]:
        return [name for name in [*self.commands, *EXIT_WORDS] if name.startswith(text)]

    def completedefault(self, text: str, line: str, begin_index: int, end_index: int) -> list[str]:
        command = self.commands.get(line.split()[0]) if line.split() else None
        if command is None:
            return []
        options = [option for action in command.parser()._actions for option in action.option_strings]
        return [option for option in options if option.startswith(text)]


def run_interactive(session: Session, commands: dict[str, Command], history_file: str) -> int:
    """Read commands at a prompt until `exit` or Ctrl-D; Ctrl-C abandons the line being typed."""
    readline = _load_history(history_file)
    shell = InteractiveShell(session, commands)
    print(shell.intro)
    try:
        while True:
            try:
                shell.cmdloop(intro="")
                break
            except KeyboardInterrupt:
                print("^C")
    finally:
        if readline is not None:
            try:
                readline.set_history_length(HISTORY_LINES_MAX)
                readline.write_history_file(history_file)
            except OSError:
                pass  # a read-only home: history is a nicety
    return 0


def _load_history(history_file: str):
    try:
        import readline
    except ImportError:  # not on every platform; the shell works without it
        return None
    try:
        readline.read_history_file(history_file)
    except (FileNotFoundError, OSError):
        pass
    readline.set_completer_delims(" \t\n")
    return readline
