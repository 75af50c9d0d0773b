"""Prompt-lookup drafting: propose what followed the context's last few tokens when they occurred before
(code edits, quotes, RAG answers, the repetitive parts of long thoughts). Needs no second model."""


class PromptLookup:
    """Proposes the continuation of the longest recent n-gram of the context seen earlier in it.

    Defaults 4 and 2: one token recurs too often in BPE text to predict what follows it, and past four a
    match is almost always unique already, so longer n-grams would only add index work.

    Args:
        ids: the context so far (prompt and committed tokens).
        ngram_max: the longest n-gram tried; longer matches are tried first.
        ngram_min: the shortest n-gram that may match.
    """

    def __init__(self, ids: list, ngram_max: int = 4, ngram_min: int = 2):
        if not 1 <= ngram_min <= ngram_max:
            raise ValueError(f"prompt lookup needs 1 <= ngram_min <= ngram_max, not ngram_min {ngram_min} "
                             f"and ngram_max {ngram_max}")
        self.ngram_min, self.ngram_max = ngram_min, ngram_max
        self.ids = []
        # n -> {n-gram: position of the token after its latest occurrence}; an n-gram enters once a token
        # follows it, so the context's own last n-gram only finds earlier occurrences
        self.index = {n: {} for n in range(ngram_min, ngram_max + 1)}
        self.extend(ids)

    def extend(self, ids: list):
        """Append committed tokens to the context."""
        for token in ids:
            end = len(self.ids)
            for n, starts in self.index.items():
                if end >= n:
                    starts[tuple(self.ids[end - n:end])] = end
            self.ids.append(int(token))

    def propose(self, k: int) -> list:
        """Up to k token ids that followed the latest earlier occurrence of the context's longest matching
        final n-gram; [] when none matches."""
        if k <= 0:
            return []
        for n in range(min(self.ngram_max, len(self.ids)), self.ngram_min - 1, -1):
            start = self.index[n].get(tuple(self.ids[-n:]))
            if start is not None:
                return self.ids[start:start + k]
        return []
