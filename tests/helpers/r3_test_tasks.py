"""A plug-in task for tests: a deterministic coin flip on the completion text, so a tiny random
model gets both rewards (real GRPO signal) without being able to solve anything."""

import hashlib

from r3.tasks.base import Task


class CoinTask(Task):
    name = "coin"

    def __init__(self, *, size: int = 64, fail_first: int = 0, **kw):
        super().__init__(**kw)
        self.size = int(size)
        self.fail_first = int(fail_first)  # the first N verdicts of this process are fails
        self.calls = 0

    def examples(self, split="train", n=None, seed=0):
        base = 0 if split == "train" else 10_000
        items = [{"id": f"{split}-{i}", "word": f"item{base + i}"} for i in range(self.size)]
        return items[:n] if n else items

    def messages(self, example):
        return [{"role": "user", "content": f"Say something about {example['word']}."}]

    def _check(self, example, completion_text):
        self.calls += 1
        if self.calls <= self.fail_first:
            return False, "coin (failed on purpose)"
        h = hashlib.sha256((example["id"] + completion_text).encode()).digest()[0]
        return h % 2 == 0, "coin"


class RaisingTask(CoinTask):
    """A verifier that raises on every completion (a typo in a field name)."""
    name = "raising"

    def _check(self, example, completion_text):
        return example["answr"] == completion_text, "exact"


class FlakyTask(CoinTask):
    """A verifier that raises on about a third of the completions, a coin flip on the rest."""
    name = "flaky"

    def _check(self, example, completion_text):
        if hashlib.sha256((example["id"] + completion_text).encode()).digest()[1] % 3 == 0:
            raise KeyError("answr")
        return super()._check(example, completion_text)


class TupleVerifyTask(CoinTask):
    """A plug-in that overrides verify() and returns _check's (bool, reason) tuple: always truthy."""
    name = "tuple-verify"

    def verify(self, example, completion_text):
        return self._check(example, completion_text)


class KeywordsTask(CoinTask):
    """Options taken as ``**kw`` and kept under another attribute name (``self.path``)."""
    name = "keywords"

    def __init__(self, *, data_path: str = "default.jsonl", **kw):
        super().__init__(**kw)
        self.path = data_path


class FileCoinTask(CoinTask):
    """CoinTask over the words of a data file (one per line)."""
    name = "file-coin"

    def __init__(self, *, data_path: str, **kw):
        super().__init__(**kw)
        self.data_path = data_path

    def examples(self, split="train", n=None, seed=0):
        words = open(self.data_path).read().split()
        items = [{"id": f"{split}-{i}", "word": w} for i, w in enumerate(words)]
        return items[:n] if n else items


class PopTask(CoinTask):
    """Options popped from **kw before the rest goes to the base class."""
    name = "pop"

    def __init__(self, **kw):
        self.source = kw.pop("source", "built-in")
        super().__init__(**kw)


class StringMessagesTask(CoinTask):
    """messages() returns the question as a string, not a list of messages."""
    name = "string-messages"

    def messages(self, example):
        return f"Say something about {example['word']}."
