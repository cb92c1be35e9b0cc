"""The coordinator's words for what hospitals did in a round, in the reader's language. The codes
(`refused:privacy-budget`, `rejected:norm` ...) are what travels and what metrics.csv keeps; these
render them for the live table, the log lines, `aseanfl status` and the console."""

from __future__ import annotations

from common.i18n import N_, _

STATUS = {"ok": N_("ok"), "error": N_("error"), "no-reply": N_("no reply"), "not-sampled": N_("not sampled"),
          "eval-only": N_("evaluated only"), "refused": N_("refused"), "rejected": N_("rejected"),
          "validation-lost": N_("trained, validation lost")}
DETAIL = {"privacy-budget": N_("privacy budget"), "privacy-ledger": N_("privacy ledger"), "decode": N_("unreadable"),
          "norm": N_("too large"), "shape": N_("wrong shape"), "non-finite": N_("NaN or Inf"),
          "identity": N_("answered as another hospital")}
NODE = {"online": N_("online"), "offline": N_("offline"), "registered": N_("registered"),
        "unregistered": N_("unregistered"), "not seen since the server restarted": N_("not seen since the server restarted"),
        "revoked": N_("revoked"), "silent": N_("silent (not heard for over 15 s)"), "provisioned, not registered yet": N_("provisioned, not registered yet")}
RUN = {"running": N_("running"), "pending": N_("pending"), "starting": N_("starting"), "finished": N_("finished"),
       "completed": N_("completed"), "stopped": N_("stopped"), "failed": N_("failed"),
       "stopped or lost (no summary)": N_("stopped or lost (no summary)")}


def status_word(status: str | None) -> str:
    """'refused:privacy-budget' -> 'refused (privacy budget)', in the reader's language; an unknown
    code as it is."""
    word, _sep, detail = (status or "ok").partition(":")
    if word not in STATUS:
        return status or ""
    text = _(STATUS[word])
    if not detail:
        return text
    return _("{status} ({reason})", status=text, reason=_(DETAIL[detail]) if detail in DETAIL else detail)


def run_word(status: str | None) -> str:
    """Flower's run status ('finished:completed', 'running') in the reader's language."""
    parts = [_(RUN[p]) if p in RUN else p for p in (status or "").split(":")]
    return ":".join(parts)


def node_word(status: str | None) -> str:
    return _(NODE[status]) if status in NODE else str(status or "")


def refusal_line(rnd: int, site: str, refusal) -> str:
    """A hospital's refusal, rendered here from its code and numbers (its English reason stays in the log)."""
    if refusal.code == "privacy-budget":
        return _("round {round}: {site} refused to train: this round would take its privacy budget past {budget} "
                 "(epsilon spent so far {spent})", round=rnd, site=site, budget=f"{refusal.epsilon_budget:g}",
                 spent=f"{refusal.epsilon_spent:.3f}")
    if refusal.code == "privacy-ledger":
        return _("round {round}: {site} refused to train: its privacy ledger cannot be read or does not add up, "
                 "so it cannot know what it has spent", round=rnd, site=site)
    return _("round {round}: {site} refused to train ({code})", round=rnd, site=site, code=refusal.code)
