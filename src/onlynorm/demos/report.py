"""Small printing helpers shared by the demos (rich tables when a console is given, plain text otherwise)."""

from __future__ import annotations

from rich.table import Table


def print_rows(console, title: str, rows: list[tuple[str, str]]) -> None:
    if console is None:
        print(title)
        width = max(len(k) for k, _ in rows)
        for k, v in rows:
            print(f"  {k:<{width}}  {v}")
        return

    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for k, v in rows:
        table.add_row(k, v)
    console.print(table)


def print_table(console, title: str, header: list[str], rows: list[list[str]]) -> None:
    """A table with a header row (rich when a console is given)."""
    if console is None:
        widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
        print(title)
        for r in [header, *rows]:
            print("  " + "  ".join(f"{str(c):<{w}}" for c, w in zip(r, widths)))
        return

    table = Table(title=title, title_justify="left")
    for i, h in enumerate(header):
        table.add_column(h, justify="left" if i == 0 else "right")
    for r in rows:
        table.add_row(*[str(c) for c in r])
    console.print(table)
