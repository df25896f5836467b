"""The CLI's contract for a user mistake, shared by the CLI tests."""

from __future__ import annotations

from sparsekit.cli.main import main


def user_error(capsys, *argv: str) -> str:  # type: ignore[no-untyped-def]
    """Run the CLI, assert a one-line user error with status 2, and return that line."""
    code = main(list(argv))
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert "Traceback" not in err and err.count("\n") == 0, err
    assert err.startswith("sparsekit ") and ": error: " in err
    return err
