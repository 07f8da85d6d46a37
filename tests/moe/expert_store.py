"""A stand-in for a quantised expert store (shared by the MoE tests)."""


class FakeStore:
    """Stands in for a quantised expert store: keeps a private tensor, counts dequantisations."""

    def __init__(self, t):
        self.t, self.shape, self.calls = t.detach().clone(), tuple(t.shape), 0

    def dequantize_expert(self, e):
        self.calls += 1
        return self.t[e].clone()

    def add_(self, e, delta):
        self.t[e] += delta
