"""Sub-labels: the classifier's running vote over a track's crops, and when to crop it next.

A track the classifier applies to (its label or its category is in
``classifier.labels_from``) is cropped when ByteTrack confirms it, then at most
once per ``every`` and at most ``max_per_track`` times. After ``every`` a crop
waits for a frame that scores at least as well as the last crop's (a better
view), but never longer than twice ``every``.

Each classification adds its probability to its class (a score-weighted
vote). The leading class is the ``sub_label``, and its score is its share of
all crops: the sum of its probabilities over the number of crops, so one bad
crop among five lowers it by a fifth instead of flipping it. Below
``min_score`` there is no sub_label (null) and the detector's label stands.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from monitor.classifier import Classification
from monitor.settings import ClassifierSettings


@dataclass(slots=True)
class Vote:
    """One track's classifications so far.

    Attributes:
        totals: Sum of probabilities per class.
        crops: Classifications counted.
        last_time: Capture time of the last crop asked for (or -inf).
        last_score: The detector's score on that crop.
        asked: A crop is on its way (asked for, not counted yet).
    """

    totals: dict[str, float] = field(default_factory=dict)
    crops: int = 0
    last_time: float = float("-inf")
    last_score: float = 0.0
    asked: bool = False

    def leader(self) -> tuple[str, float] | None:
        """The leading class and its score (its share of all crops), or None before any crop."""
        if not self.crops:
            return None
        label = max(self.totals, key=lambda k: self.totals[k])
        return label, self.totals[label] / self.crops


class SubLabeler:
    """One camera's classifier rules.

    Args:
        settings: The classifier as this camera uses it.
        category_of: The camera's label -> category table.
    """

    def __init__(self, settings: ClassifierSettings, category_of: Callable[[str], str]) -> None:
        self.settings = settings
        self._category_of = category_of
        self._applies: dict[str, bool] = {}

    def applies(self, label: str) -> bool:
        """True when detections of ``label`` (a detector label) are classified."""
        known = self._applies.get(label)
        if known is None:
            wanted = self.settings.labels_from
            known = self._applies[label] = label in wanted or self._category_of(label) in wanted
        return known

    def due(self, vote: Vote, score: float, now: float) -> bool:
        """Whether a detection scoring ``score`` at ``now`` should be cropped for this track."""
        settings = self.settings
        if vote.asked or vote.crops >= settings.max_per_track:
            return False
        waited = now - vote.last_time
        if waited < settings.every:
            return False
        return score >= vote.last_score or waited >= 2 * settings.every

    def ask(self, vote: Vote, score: float, now: float) -> None:
        """Record that a crop at ``now`` (detector score ``score``) was sent to the classifier."""
        vote.asked, vote.last_time, vote.last_score = True, now, score

    def add(self, vote: Vote, result: Classification) -> None:
        """Count one classification."""
        vote.asked = False
        vote.crops += 1
        vote.totals[result.label] = vote.totals.get(result.label, 0.0) + result.score

    def sub_label(self, vote: Vote) -> tuple[str | None, float | None]:
        """``(sub_label, sub_label_score)``: the leader when it reaches ``min_score``, else both None."""
        leader = vote.leader()
        if leader is None or leader[1] < self.settings.min_score:
            return None, None
        return leader[0], round(leader[1], 4)
