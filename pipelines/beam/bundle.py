"""Elements grouped into bundles of about a fixed number of tokens, so per-call costs of scoring are paid once per
bundle, not once per small element (a training step of a few thousand tokens)."""

from __future__ import annotations

import apache_beam as beam
from apache_beam.transforms import window


class BundleByTokens(beam.DoFn):
    """Consecutive elements of a runner's bundle -> lists of elements holding about ``max_tokens`` tokens (an
    element larger than that is a list of its own); ``size(element)`` gives an element's tokens. Memory per worker
    is bounded by ``max_tokens`` plus one element. What is grouped with what depends on the runner's bundles, so
    the consumer must give each element the same result whatever it is bundled with."""

    def __init__(self, size, max_tokens: int):
        super().__init__()
        self.size, self.max_tokens = size, int(max_tokens)

    def start_bundle(self):
        self._buf, self._n = [], 0

    def process(self, element):
        n = int(self.size(element))
        if self._buf and self._n + n > self.max_tokens:
            yield self._buf
            self._buf, self._n = [], 0
        self._buf.append(element)
        self._n += n

    def finish_bundle(self):
        if self._buf:
            yield window.GlobalWindows.windowed_value_at_end_of_window(self._buf)
        self._buf, self._n = [], 0
