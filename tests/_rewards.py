"""A dense reward for trainer tests: an untrained policy gets varied scores, so advantages are not
all zero and the first updates actually move the parameters."""

import numpy as np


def digit_fraction(completions, answers, **fields):
    del answers, fields
    return np.asarray([sum(c.isdigit() for c in text) / max(len(text), 1) for text in completions],
                      np.float32)


def scoring_process(completions, answers, **fields):
    """The process id of the trainer process whose reward worker scored each item."""
    del answers, fields
    import os

    return np.full(len(completions), os.getppid(), np.float32)


def first_is_digit(completions, answers, **fields):
    """1 when the completion starts with a digit: a binary reward, so that some groups of a
    random policy come out all equal (dynamic sampling's case)."""
    del answers, fields
    return np.asarray([float(text[:1].isdigit()) for text in completions], np.float32)
