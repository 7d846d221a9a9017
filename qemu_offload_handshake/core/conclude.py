"""Both ends of a handshake's decision, pure.

* ``answer_from(offer, ...)``: the destination decides from the offer's source report and its own truth (a
  probed report, or its host's dump) with exactly the precheck's decision (``decide`` / ``decide_from_dump``) and
  the offer's mode and policy, and puts the verdict in an ``Answer``.
* ``verdict_of(offer, answer)``: the source makes the same decision again from the same two reports (so that it
  renders the same verdict, devices and all, as a direct precheck) and checks that the destination came to the
  same outcome and overrides; when they differ (another version of this tool on the other end, a tampered
  answer) the verdict is ``unknown`` (``handshake-disagrees``): contradictory information is never compatible.
"""

from __future__ import annotations

from collections.abc import Iterable

from .decide import decide, with_findings
from .errors import UsageError
from .exchange import Answer, Offer, Truth, overrides
from .model import VmReport
from .platform import HostDump
from .policy import Policy
from .predict import decide_from_dump
from .rules import severity_of
from .verdict import Finding, Outcome, Verdict, outcome_of

__all__ = ["answer_from", "policy_of", "verdict_of"]


def policy_of(offer: Offer) -> Policy:
    """The offer's policy; ``UsageError`` naming the property when this side does not know one."""
    return Policy(dict(offer.policy))


def _decide(offer: Offer, dest: VmReport | None, dump: HostDump | None) -> Verdict:
    policy = policy_of(offer)
    if dump is not None:
        return decide_from_dump(offer.source, dump, mode=offer.mode, policy=policy)
    return decide(offer.source, dest, mode=offer.mode, policy=policy)


def answer_from(offer: Offer, *, truth: Truth, how: str, dest: VmReport | None = None, dump: HostDump | None = None,
                findings: Iterable[tuple[str, str, str]] = ()) -> Answer:
    """The destination's answer. With ``dest`` (truth INCOMING or SCRATCH) or ``dump`` (DUMP), the precheck's
    decision; with neither (NONE), the verdict of ``findings`` alone ((device, rule code, sentence): why no truth
    could be had, e.g. ``dest-cannot-run`` or ``probe-failed``)."""
    found = tuple(findings)
    try:
        if dest is None and dump is None:
            raise LookupError
        verdict = with_findings(_decide(offer, dest, dump), found) if found else _decide(offer, dest, dump)
    except UsageError as err:  # a policy property this side does not know: no decision can be made
        truth, dest, dump, found = Truth.NONE, None, None, (("", "probe-failed", f"the offer cannot be decided "
                                                                                f"here: {err}"),)
        verdict = _from_findings(offer, found)
    except LookupError:
        verdict = _from_findings(offer, found)
        if verdict.outcome in (Outcome.COMPATIBLE, Outcome.ADJUSTABLE):  # no truth is never compatible
            verdict = _from_findings(offer, (*found, ("", "probe-failed", "the destination has no truth to answer "
                                                                          "from")))
    return Answer(offer.nonce, truth, how, verdict.outcome, verdict.mode, verdict.findings,
                  overrides(verdict.adjustments), overrides(verdict.recommendations), dest=dest, dump=dump)


def _from_findings(offer: Offer, found: Iterable[tuple[str, str, str]]) -> Verdict:
    findings = tuple(Finding(device, severity_of(code, offer.mode), code, why) for device, code, why in found)
    return Verdict(outcome_of(findings), offer.mode, findings, source=offer.source)


def verdict_of(offer: Offer, answer: Answer) -> Verdict:
    """The verdict the source reports: the same decision on the same reports, with how the destination got its
    truth (``handshake``) and, when the destination's own verdict differs, ``handshake-disagrees``."""
    if answer.nonce != offer.nonce:
        raise ValueError("the answer is not to this offer (nonce)")
    if answer.dest is None and answer.dump is None:
        # Nothing to decide again from: its findings, weighed by this side's rules, must say why not (blocked or
        # unknown), and say what the destination said.
        verdict = _from_findings(offer, [(f.device, f.code, f.why) for f in answer.findings])
        if verdict.outcome in (Outcome.COMPATIBLE, Outcome.ADJUSTABLE) or verdict.outcome is not answer.outcome \
                or answer.mode is not offer.mode:
            verdict = with_findings(verdict, [("", "handshake-disagrees", "the destination says "
                                               f"{answer.outcome.value} ({answer.mode.value}) without a report or "
                                               "dump to show for it, and its findings do not say so")])
    else:
        try:
            verdict = _decide(offer, answer.dest, answer.dump)
        except UsageError as err:  # cannot happen for an offer this side made; kept fail-closed
            verdict = _from_findings(offer, [("", "probe-failed", f"cannot decide: {err}")])
        theirs = (answer.outcome, answer.mode, answer.adjustments)
        ours = (verdict.outcome, verdict.mode, overrides(verdict.adjustments))
        if theirs != ours:
            said = answer.outcome.value + (f" with adjustments {answer.adjustments_dict}" if answer.adjustments else "")
            mine = verdict.outcome.value + (f" with adjustments {verdict.adjustments}" if verdict.adjustments else "")
            verdict = with_findings(verdict, [("", "handshake-disagrees", f"the destination concluded {said} from the "
                                               f"same reports, this side {mine}: another version of this tool "
                                               "there, or an altered answer")])
    return with_findings(verdict, [("", "handshake", f"the destination answered from {answer.how}")])
