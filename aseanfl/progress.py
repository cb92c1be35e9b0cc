"""Live round display for the terminal (rich)."""

from __future__ import annotations

from collections.abc import Callable

from rich.cells import cell_len
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bar, TextColumn, TimeElapsedColumn
from rich.table import Table

from server.records.digest import MANY, digest
from server.engine.plan import PHASES, Progress
from server.records.outputs import GLOBAL, score_of
from server.records.words import refusal_line, status_word

from common.i18n import _, size


def _f(value) -> str:
    return "-" if value is None or value != value else f"{value:.3f}" if isinstance(value, float) else str(value)


def _columns(score: tuple[str, str], personal: bool = False) -> list[tuple[str, Callable[[dict], str], int]]:
    """(header, cell, priority): at a narrow width the highest priority numbers are dropped first.
    `personal`: the rows hold Ditto's / APFL's personalized scores too."""
    key, name = score
    own = [(_("personal {score}", score=name), lambda r: _f(r.get(f"pers_val_{key}")), 2)] if personal else []
    return [
        (_("site"), lambda r: r["site"], 0),
        (_("status"), lambda r: "" if r["site"] == GLOBAL else status_word(r.get("status") or "ok"), 1),
        (_("epsilon"), lambda r: _f(r.get("epsilon")), 3),
        (_("train loss"), lambda r: _f(r.get("train_loss")), 7),
        (_("val loss"), lambda r: _f(r.get("val_loss")), 8),
        (_("val {score}", score=name), lambda r: _f(r.get(f"val_{key}")), 2),
        *own,
        (_("test {score}", score=name), lambda r: _f(r.get(f"test_{key}")), 6),
        (_("examples"), lambda r: _f(r.get("num_train")), 4),
        (_("bytes out"), lambda r: size(r.get("bytes_from_site")), 5),
    ]


PAD = 3  # rich's table: a space each side of a cell and a rule between columns (one rule fewer in all)


def fit(headers: list[str], cells: list[list[str]], priority: list[int], width: int | None) -> list[int]:
    """The columns (indices, in order) that fit `width` whole, dropping the least needed first;
    all of them when width is None."""
    need = [max([cell_len(h)] + [cell_len(row[i]) for row in cells]) + PAD for i, h in enumerate(headers)]
    keep = list(range(len(headers)))
    if width is None:
        return keep
    for i in sorted(keep, key=lambda i: -priority[i]):
        if sum(need[j] for j in keep) - 1 <= width or priority[i] <= 1:  # site and status always stay
            break
        keep.remove(i)
    return keep


def table_width(table: Table) -> int:
    """The width a table needs to print every column whole (for output with no width: a log)."""
    from rich.console import Console as Measure

    return Measure(width=10_000).measure(table).maximum


class RichProgress(Progress):
    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console()
        self.bar = Bar(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                       TimeElapsedColumn(), console=self.console, transient=False)
        self.task = None

    def __enter__(self) -> "RichProgress":
        self.bar.start()
        return self

    def __exit__(self, *exc) -> None:
        self.bar.stop()

    def round_started(self, rnd: int, total: int, phase: str) -> None:
        if self.task is None:
            self.task = self.bar.add_task(_("rounds"), total=total)
        self.bar.update(self.task, description=_("round {round}/{total}: {phase}", round=rnd, total=total,
                                                             phase=_(PHASES.get(phase, phase))))

    def round_finished(self, rnd: int, total: int, rows: list[dict]) -> None:
        title, caption = _("Round {round}/{total}", round=rnd, total=total), None
        if len(rows) - 1 > MANY:  # hundreds of sites: the digest, the sites worth a look, the global row
            d = digest(rows)
            title = _("Round {round}/{total}: {sites} sites: {counts}", round=rnd, total=total, sites=d.sites,
                      counts=d.counts())
            caption = _("{spread}; shown: failed, worst and best sites; every row in metrics.csv", spread=d.spread())
            rows = d.shown() + [r for r in rows if r["site"] == GLOBAL]
        columns = _columns(score_of(rows), any(r.get("pers_val_accuracy") is not None for r in rows))
        cells = [[cell(r) for _h, cell, _p in columns] for r in rows]
        # In a terminal, the columns that fit its width, whole; piped into a log, every column
        # (a log has no width, and a cut line is lost for good).
        width = self.console.width if self.console.is_terminal else None
        keep = fit([h for h, _c, _p in columns], cells, [p for _h, _c, p in columns], width)
        left = [columns[i][0] for i in range(len(columns)) if i not in keep]
        if left:
            note = _("not shown at this width: {columns} (every column is in metrics.csv)", columns=", ".join(left))
            caption = f"{caption}\n{note}" if caption else note
        table = Table(title=title, title_justify="left", show_edge=False, caption=caption, caption_justify="left")
        for i in keep:
            table.add_column(columns[i][0], justify="left" if i <= 1 else "right", no_wrap=True)
        for r, row in zip(rows, cells, strict=True):
            table.add_row(*(row[i] for i in keep), style="bold" if r["site"] == GLOBAL else None)
        if width is None:  # Console.print never goes past the console's width: widen it for this table
            narrow, self.console.width = self.console.width, max(self.console.width, table_width(table))
            try:
                self.console.print(table)
            finally:
                self.console.width = narrow
        else:
            self.console.print(table)
        self.bar.update(self.task, completed=rnd)

    def refused(self, rnd: int, site: str, refusal) -> None:
        self.bar.console.print(f"[yellow]{escape(refusal_line(rnd, site, refusal))}[/]", soft_wrap=True)

    def problem(self, text: str) -> None:  # a sentence whole: the terminal wraps it, nothing cuts it
        self.bar.console.print(_("[yellow]warning:[/] {text}", text=text), soft_wrap=True)
