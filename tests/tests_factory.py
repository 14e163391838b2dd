"""A 'module:fn' dataset factory used by the tests (importable from tests/)."""
import numpy as np
import torch


def make():
    return [(torch.full((4,), float(i)), i) for i in range(5)]


def one_logit():
    """A binary classifier with one logit (5 inputs), seeded."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))


def bce(out, y):
    """Per-example binary cross-entropy of one logit against 0/1 labels."""
    return torch.nn.functional.binary_cross_entropy_with_logits(out[:, 0], y.to(out.dtype), reduction="none")


def huber(out, y):
    """Per-example Huber loss of one output against a float target."""
    return torch.nn.functional.huber_loss(out[:, 0], y.to(out.dtype), reduction="none")


#: the labels :func:`relabeled` gives; a test changes them between runs, as a user fixing labels would
LABELS = [0, 1, 2, 3]


def relabeled():
    """90 examples of the helpers' MLP (12 features), labels cycled from :data:`LABELS`."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(90, 12, generator=g)
    return [(x[i], LABELS[i % len(LABELS)]) for i in range(90)]


def relabeled_int32():
    """:func:`relabeled`'s examples, their labels as int32 tensors (as a loader of a parquet
    column or of a numpy int32 array gives them)."""
    return [(x, torch.tensor(y, dtype=torch.int32)) for x, y in relabeled()]


def reads_a_value(d_in=12, hidden=8, n_classes=4, depth=1):
    """The helpers' MLP from a factory that reads a value while it builds (as one that loads a
    file would): it cannot be built on the meta device."""
    from gradscore.demos.models import mlp
    model = mlp(d_in=d_in, hidden=hidden, n_classes=n_classes, depth=depth)
    float(next(model.parameters()).detach().sum())
    return model


def eager_net():
    """12 features -> 4 classes, its first layer's shape given."""
    return torch.nn.Sequential(torch.nn.Linear(12, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4))


def lazy_net():
    """:func:`eager_net` with its first layer lazy (nn.LazyLinear: the shape comes from a forward)."""
    return torch.nn.Sequential(torch.nn.LazyLinear(8), torch.nn.Tanh(), torch.nn.Linear(8, 4))


class _DropsInEval(torch.nn.Module):
    """An MLP whose forward calls ``F.dropout(h, 0.5)`` without ``training=self.training``
    (F.dropout's default is training=True): random in eval mode too, a common slip."""

    def __init__(self, d_in: int, hidden: int, n_classes: int) -> None:
        super().__init__()
        self.a, self.b = torch.nn.Linear(d_in, hidden), torch.nn.Linear(hidden, n_classes)

    def forward(self, x):
        return self.b(torch.nn.functional.dropout(torch.tanh(self.a(x)), 0.5))


def drops_in_eval(d_in=12, hidden=8, n_classes=4):
    """:class:`_DropsInEval`, seeded."""
    torch.manual_seed(0)
    return _DropsInEval(d_in, hidden, n_classes)


def ends_in_softmax(d_in=12, hidden=8, n_classes=4):
    """The helpers' MLP with a softmax at its end (its outputs are probabilities), seeded."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(d_in, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, n_classes),
                               torch.nn.Softmax(-1))


def embeddings(sparse=False):
    """Tokens (ids < 11) -> 3 classes through nn.Embedding and nn.EmbeddingBag, both with
    ``sparse`` gradients or both dense; seeded, so the two kinds hold the same weights."""
    torch.manual_seed(0)
    return _Embeddings(sparse)


class _Embeddings(torch.nn.Module):
    def __init__(self, sparse: bool) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(11, 4, sparse=sparse)
        self.bag = torch.nn.EmbeddingBag(11, 4, mode="sum", sparse=sparse)
        self.head = torch.nn.Linear(4, 3)

    def forward(self, tokens):
        return self.head(torch.tanh(self.emb(tokens).mean(1) + self.bag(tokens)))


def odd_width(width=4):
    """A factory that checks its own argument (as a user's does): an odd width is its ValueError."""
    if width % 2:
        raise ValueError("width must be even")
    return torch.nn.Linear(width, 3)


class _TiedHead(torch.nn.Module):
    def __init__(self, vocab: int, d: int) -> None:
        super().__init__()
        self.emb, self.mid = torch.nn.Embedding(vocab, d), torch.nn.Linear(d, d)
        self.head = torch.nn.Linear(d, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(torch.tanh(self.mid(self.emb(ids))).mean(1))


def tied_head(vocab=9, d=4):
    """Token ids (B, T) to one of ``vocab`` classes by a head tied to the input embedding."""
    return _TiedHead(vocab, d)


class _Flipped(torch.utils.data.Dataset):
    """12 examples of 6 features, each flipped in sign at random when read (``augment``),
    as a training transform's random flips are; ``numpy``: the draw is numpy's."""

    def __init__(self, augment: bool, numpy: bool = False) -> None:
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(12, 6, generator=g), torch.randint(0, 3, (12,), generator=g)
        self.augment, self.numpy = augment, numpy

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i):
        flip = (np.random.rand() < 0.5) if self.numpy else bool(torch.rand(()) < 0.5)
        return (-self.x[i] if self.augment and flip else self.x[i]), self.y[i]


def augmented():
    return _Flipped(True)


def augmented_numpy():
    return _Flipped(True, numpy=True)


def not_augmented():
    return _Flipped(False)


def text_labels():
    """Items whose targets are class names, not indices."""
    return [(torch.full((6,), float(i)), "cat") for i in range(5)]


def ragged():
    """Items whose inputs differ in shape (a transform that does not resize)."""
    return [(torch.zeros(6 + i % 2), 0) for i in range(5)]


def in_dtype(dtype="float32", **kwargs):
    """The demos' MLP built in ``dtype`` (as a Hugging Face config's "dtype" builds it)."""
    from gradscore.demos.models import mlp
    return mlp(**kwargs).to(getattr(torch, dtype))
