"""Live round display for the terminal (rich)."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bar, TextColumn, TimeElapsedColumn
from rich.table import Table

from server.records.digest import MANY, digest
from server.engine.plan import PHASES, Progress
from server.records.outputs import score_of
from server.records.words import refusal_line, status_word

from common.i18n import _


def _f(value) -> str:
    return "-" if value is None or value != value else f"{value:.3f}" if isinstance(value, float) else str(value)


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
            rows = d.shown() + [r for r in rows if r["site"] == "global"]
        table = Table(title=title, title_justify="left", show_edge=False, caption=caption, caption_justify="left")
        score, name = score_of(rows)
        widest = max(len(r["site"]) for r in rows)  # site names whole, however narrow the terminal or pipe
        columns = (_("site"), _("status"), _("epsilon"), _("train loss"), _("val loss"), _("val {score}", score=name),
                   _("test {score}", score=name), _("examples"), _("bytes out"))
        for i, col in enumerate(columns):
            if i == 0:
                table.add_column(col, justify="left", no_wrap=True, min_width=widest)
            else:
                table.add_column(col, justify="right")
        for r in rows:
            style = "bold" if r["site"] == "global" else None
            status = "" if r["site"] == "global" else status_word(r.get("status") or "ok")
            table.add_row(r["site"], status, _f(r.get("epsilon")), _f(r.get("train_loss")), _f(r.get("val_loss")),
                          _f(r.get(f"val_{score}")), _f(r.get(f"test_{score}")), _f(r.get("num_train")),
                          _f(r.get("bytes_from_site")), style=style)
        self.bar.console.print(table)
        self.bar.update(self.task, completed=rnd)

    def refused(self, rnd: int, site: str, refusal) -> None:
        self.bar.console.print(f"[yellow]{escape(refusal_line(rnd, site, refusal))}[/]")

    def problem(self, text: str) -> None:
        self.bar.console.print(_("[yellow]warning:[/] {text}", text=text))
