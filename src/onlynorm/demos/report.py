"""Small printing helpers shared by the demos (rich tables when a console is given, plain text otherwise)."""

from __future__ import annotations


def print_rows(console, title: str, rows: list[tuple[str, str]]) -> None:
    if console is None:
        print(title)
        width = max(len(k) for k, _ in rows)
        for k, v in rows:
            print(f"  {k:<{width}}  {v}")
        return
    from rich.table import Table

    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for k, v in rows:
        table.add_row(k, v)
    console.print(table)
