"""Scripted mode: commands from `-c "cmd; cmd"` or from stdin, run in order until one fails."""

from __future__ import annotations

from .commands import OK, Command, Session, run_command_line


def split_commands(text: str) -> list[str]:
    """The commands in `text`: separated by `;` or new lines outside quotes; blank ones and
    `#` comments (from `#` at the start of a command to the end of its line) left out."""
    commands: list[str] = []
    current: list[str] = []
    quote: str | None = None
    in_comment = False
    escaped = False
    for character in text:
        if in_comment:
            if character == "\n":
                in_comment = False
            continue
        if escaped:
            current.append(character)
            escaped = False
            continue
        if character == "\\" and quote != "'":
            current.append(character)
            escaped = True
            continue
        if quote is not None:
            current.append(character)
            if character == quote:
                quote = None
            continue
        if character in "'\"":
            quote = character
            current.append(character)
        elif character in ";\n":
            commands.append("".join(current).strip())
            current = []
        elif character == "#" and not "".join(current).strip():
            in_comment = True
        else:
            current.append(character)
    commands.append("".join(current).strip())
    return [command for command in commands if command]


def run_script(session: Session, commands: dict[str, Command], text: str) -> int:
    """Run every command in `text` in order; stop at the first that fails, name it, and return
    its exit status (0 when all succeed)."""
    lines = split_commands(text)
    for number, line in enumerate(lines, start=1):
        status = run_command_line(session, commands, line)
        if status != OK:
            session.printer.note(f"shell: command {number} of {len(lines)} failed (exit status {status}): {line}")
            return status
    return OK
