"""Scripted environments for tests (named "tests._envs:<name>" like user environments)."""

from cfpo_jax.envs import Message, ToolCall


class CheckWithCalculator:
    """Answers the first turn with the calculator's value of the question's expression (a tool
    call), the second with feedback; ends after the third."""

    def __init__(self, example, tools):
        self.expression = example["question"].removeprefix("What is ").rstrip("?")
        self.tools = tools
        self.turns = []

    def step(self, turn):
        self.turns.append(turn)
        if turn.index == 1:
            return [self.tools.call(ToolCall(text=self.expression))]
        if turn.index == 2:
            return [Message("user", "sure?")]
        return None


def derived_calls(example, tools):
    """Every turn calls the calculator on an expression of the turn's length (so the answer
    depends on what was sampled), for up to three turns."""

    class Env:
        def step(self, turn):
            if turn.index > 3:
                return None
            return [tools.call(ToolCall(text=f"{len(turn.text)} * 7"))]

    return Env()
