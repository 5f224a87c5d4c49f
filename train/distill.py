"""Hidden-state distillation: the objective of `train.pretrain` with `objective: distill` (recovery stage 1).

The converted all-MiniLM-L6-v2 (train.initialize on the BERT-superset tokenizer, whose first 30,522 ids are
bert-base-uncased's) has MiniLM's weights but ALiBi in place of absolute position embeddings. Reproducing MiniLM's
pooled embedding alone (one 384-dim target per text, sentence-transformers' MSELoss) brings it back slowly. Here the
student reads the teacher's own token ids and matches, token by token, the teacher's hidden state after every layer
(TinyBERT / MiniLM-style layer distillation): hundreds of targets per text, aligned exactly, at the cost of one
teacher forward. Two embedding terms keep the sentence vector itself on target: the student's mean-pooled,
normalised embedding against the teacher's, once on the teacher's ids and once on the student's own tokenization,
which is the only place the 22,021 new medical tokens learn in this stage.

    loss = hidden_weight * mean_l MSE(h_student_l, h_teacher_l)          (real tokens, layers 1..L)
         + embedding_weight * (1 - cos(e_student(teacher ids), e_teacher))
         + embedding_weight * (1 - cos(e_student(own tokens), e_teacher))

`WordAlignedDistillation` (`objective: word_distill`) is the variant for a student on a different vocabulary: targets
per word rather than per token, and only the new tokens' embeddings trained (vocabulary transfer).

Texts are `train.finetune.mse_texts` (same pool, same seeded draw, same `exclude_sources` filter), batched in
length buckets so that short terms and long documents do not pad each other.
"""

import collections
import dataclasses
import random

import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoTokenizer, PreTrainedTokenizerBase

from corpus.dataset import DataBuild
from train.finetune import mse_texts, teacher_path

BUCKET_BATCHES = 50  # batches sorted by length together: long enough to pad little, short enough to stay mixed


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sentence-transformers' mean pooling then normalisation (what the model's embedding is)."""
    mask = mask.unsqueeze(-1).to(hidden.dtype)
    return F.normalize((hidden * mask).sum(1) / mask.sum(1).clamp(min=1), dim=-1)


def check_shared_ids(student: PreTrainedTokenizerBase, teacher: PreTrainedTokenizerBase) -> None:
    """The student must read the teacher's token ids as the same tokens, or layer targets do not align."""
    student_vocab = student.get_vocab()
    moved = [t for t, i in teacher.get_vocab().items() if student_vocab.get(t) != i]
    if moved:
        raise ValueError(
            f"hidden-state distillation needs a student tokenizer that keeps the teacher's vocabulary at its ids; "
            f"{len(moved):,} teacher tokens are missing or moved (e.g. {moved[:5]}). Convert the teacher onto the "
            "BERT-superset tokenizer: python -m tokenizer.train --recipe bert_superset, then train.initialize "
            "minilm --tokenizer that folder."
        )


def length_buckets(texts: list[str], tokenizer, batch_size: int, seed: int) -> list[str]:
    """`texts` reordered so that each consecutive `batch_size` slice holds texts of similar length; the order of the
    batches is shuffled (seeded), so the stream still mixes sources and lengths."""
    lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]]
    rng = random.Random(seed)
    order = list(range(len(texts)))
    rng.shuffle(order)
    span = batch_size * BUCKET_BATCHES
    batches = []
    for start in range(0, len(order), span):
        chunk = sorted(order[start : start + span], key=lambda i: lengths[i])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return [texts[i] for batch in batches for i in batch]


class HiddenStateDistillation:
    """The teacher, the training texts and the loss of one distillation run (see the module docstring)."""

    def __init__(self, recipe, tokenizer: PreTrainedTokenizerBase, device: torch.device):
        self.recipe, self.tokenizer, self.device = recipe, tokenizer, device
        folder = teacher_path(recipe.teacher)
        self.teacher_tokenizer = AutoTokenizer.from_pretrained(folder)
        self.check_tokenizers()
        self.teacher = AutoModel.from_pretrained(folder).to(device).eval().requires_grad_(False)
        self.texts = length_buckets(self.training_texts(), tokenizer, recipe.batch_size, recipe.seed)
        held = DataBuild(recipe.data).corpus("validation", columns=["text"])["text"].to_pylist()
        self.validation = random.Random(recipe.seed).sample(held, min(recipe.eval_texts, len(held)))

    def check_tokenizers(self) -> None:
        check_shared_ids(self.tokenizer, self.teacher_tokenizer)

    def training_texts(self) -> list[str]:
        # the recipe names its draw as fine-tuning does (PretrainRecipe.distill_mse_texts)
        return mse_texts(self.recipe)

    def _encode(self, tokenizer, texts: list[str]) -> dict[str, torch.Tensor]:
        batch = tokenizer(
            texts, padding=True, truncation=True, max_length=self.recipe.seq_len, return_tensors="pt", verbose=False
        )
        return {k: batch[k].to(self.device) for k in ("input_ids", "attention_mask")}

    def losses(self, encoder, texts: list[str]) -> dict[str, torch.Tensor]:
        """The three terms for a batch of texts; `encoder` is the student's MedEIRModel (or its DDP wrapper), run
        once on both tokenizations stacked (DDP allows one forward per backward)."""
        shared = self._encode(self.teacher_tokenizer, texts)
        own = self._encode(self.tokenizer, texts)
        with torch.no_grad():
            teacher = self.teacher(**shared, output_hidden_states=True).hidden_states
        width = max(shared["input_ids"].shape[1], own["input_ids"].shape[1])
        stacked = {
            key: torch.cat([F.pad(part[key], (0, width - part[key].shape[1]), value=pad) for part in (shared, own)])
            for key, pad in (("input_ids", self.tokenizer.pad_token_id), ("attention_mask", 0))
        }
        outputs = encoder(**stacked, output_hidden_states=True).hidden_states
        size, length = shared["input_ids"].shape
        student = [h[:size, :length] for h in outputs]
        mask = shared["attention_mask"].unsqueeze(-1).to(student[-1].dtype)
        tokens = mask.sum() * student[-1].shape[-1]
        layers = range(1, len(teacher))  # layer 0 holds MiniLM's absolute position embeddings: no target
        hidden = sum(((student[i] - teacher[i].to(student[i].dtype)) ** 2 * mask).sum() / tokens for i in layers)
        target = mean_pool(teacher[-1].float(), shared["attention_mask"])
        on_shared = mean_pool(student[-1].float(), shared["attention_mask"])
        on_own = mean_pool(outputs[-1][size:].float(), stacked["attention_mask"][size:])
        return {
            "hidden": hidden / len(layers),
            "embedding_shared": 1 - (on_shared * target).sum(-1).mean(),
            "embedding_own": 1 - (on_own * target).sum(-1).mean(),
        }

    def loss(self, encoder, texts: list[str]) -> tuple[torch.Tensor, dict[str, float]]:
        parts = self.losses(encoder, texts)
        r = self.recipe
        embedding = sum(v for k, v in parts.items() if k.startswith("embedding"))
        total = r.hidden_weight * parts["hidden"] + r.embedding_weight * embedding
        return total, {f"train/{k}": v.item() for k, v in parts.items()}

    @torch.no_grad()
    def evaluate(self, encoder, accelerator) -> dict[str, float]:
        """Student-teacher agreement on held-out corpus texts (validation split, never trained on): mean cosine of
        the embeddings as a user computes them (the student's own tokenizer) and the per-layer hidden-state MSE."""
        encoder.eval()
        sums = torch.zeros(2, device=accelerator.device)
        size = self.recipe.batch_size
        shard = self.validation[accelerator.process_index :: accelerator.num_processes]
        for start in range(0, len(shard), size):
            chunk = shard[start : start + size]
            parts = self.losses(accelerator.unwrap_model(encoder), chunk)
            sums += torch.stack([parts["hidden"], 1 - parts["embedding_own"]]).to(sums) * len(chunk)
        sums = accelerator.reduce(sums, reduction="sum")
        encoder.train()
        count = max(len(self.validation), 1)
        return {"eval/hidden_mse": float(sums[0]) / count, "eval/cosine_to_teacher": float(sums[1]) / count}


def word_spans(encoding) -> list[tuple[int, int]]:
    """The character span of every word (BERT's pre-tokenizer's words) of a fast tokenizer's `Encoding`, in order."""
    spans: dict[int, tuple[int, int]] = {}
    for word, (start, end) in zip(encoding.word_ids, encoding.offsets, strict=True):
        if word is not None:
            spans[word] = (spans[word][0], end) if word in spans else (start, end)
    return [spans[w] for w in sorted(spans)]


def complete_words(encoding, max_length: int) -> int:
    """How many leading words keep all their tokens when the encoding is cut to `max_length` ([SEP] re-appended)."""
    words = encoding.word_ids
    if len(words) <= max_length:
        return len(word_spans(encoding))
    return words[max_length - 1]  # the word cut at the last kept position, and every later one, is incomplete


def aligned_words(student: list, teacher: list, max_length: int) -> list[int | None]:
    """Per text, how many leading words give targets (complete in both tokenizations cut to `max_length`), or None
    where the two tokenizers do not split the text into the same words."""
    return [
        min(complete_words(a, max_length), complete_words(b, max_length)) if word_spans(a) == word_spans(b) else None
        for a, b in zip(student, teacher, strict=True)
    ]


class WordAlignedDistillation(HiddenStateDistillation):
    """Vocabulary transfer (`objective: word_distill`): the student reads its own tokenization, the teacher its own,
    and both are aligned word by word. Both tokenizers are lower-cased WordPiece behind BERT's pre-tokenizer, so
    they split a text into the same words, each into its own pieces; the mean of the student's hidden states over a
    word's tokens then has a target at every depth, the mean of the teacher's over its pieces:

        loss = hidden_weight * mean_l MSE(word means of h_student_l, word means of h_teacher_l)   (layers 0..L)
             + embedding_weight * (1 - cos(e_student(own tokens), e_teacher))

    With `new_rows_only` (see `freeze_shared`) only the embeddings of the tokens the teacher's vocabulary lacks train,
    which is all a mean-of-pieces initialisation got wrong; the teacher's function is kept exactly. With
    `distill_words`, every word of the pool that uses a new row is also read alone (`covering_words`): drawn texts
    reach only the rows their words happen to use. A text whose
    words do not agree (e.g. a different normaliser) gives no word targets, only the sentence one, and is counted
    (`train/skipped_texts`)."""

    def check_tokenizers(self) -> None:
        """Word alignment needs no shared ids, only fast tokenizers (word ids and offsets)."""
        if not (self.tokenizer.is_fast and self.teacher_tokenizer.is_fast):
            raise ValueError("word-aligned distillation needs fast tokenizers (word_ids and offsets)")

    def training_texts(self) -> list[str]:
        """The drawn texts, then `distill_words` one-word texts: the words of the whole pool (excluded sources left
        out) that use a new row, most frequent first (`covering_words`)."""
        if not self.recipe.distill_words:
            return super().training_texts()
        # the whole pool in its seeded order, read once: the drawn texts are its first `distill_texts`
        pool = mse_texts(dataclasses.replace(self.recipe, distill_texts=10**12))
        rows = set(self.new_rows().tolist())
        return pool[: self.recipe.distill_texts] + covering_words(pool, self.tokenizer, rows, self.recipe.distill_words)

    def new_rows(self) -> torch.Tensor:
        """Ids of the student's tokens that the teacher's vocabulary lacks."""
        teacher = self.teacher_tokenizer.get_vocab()
        return torch.tensor(sorted(i for t, i in self.tokenizer.get_vocab().items() if t not in teacher))

    def freeze_shared(self, encoder: torch.nn.Module) -> torch.nn.Parameter:
        """Freeze the encoder except the embedding rows of new tokens (a gradient mask on the table); the table is
        returned because weight decay, which ignores gradients, must not touch it."""
        encoder.requires_grad_(False)
        table = encoder.get_input_embeddings().weight.requires_grad_(True)
        mask = torch.zeros(table.shape[0], 1, dtype=table.dtype, device=table.device)
        mask[self.new_rows().to(table.device)] = 1
        table.register_hook(lambda grad: grad * mask)
        return table

    def _batch(self, tokenizer, encodings: list) -> dict[str, torch.Tensor]:
        """Padded ids and mask, each text cut to `seq_len` tokens with its [SEP] kept."""
        limit = self.recipe.seq_len
        ids = [e.ids if len(e.ids) <= limit else [*e.ids[: limit - 1], tokenizer.sep_token_id] for e in encodings]
        width = max(map(len, ids))
        input_ids = torch.full((len(ids), width), tokenizer.pad_token_id)
        mask = torch.zeros(len(ids), width, dtype=torch.long)
        for row, seq in enumerate(ids):
            input_ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
        return {"input_ids": input_ids.to(self.device), "attention_mask": mask.to(self.device)}

    def _word_index(self, encodings: list, words: list[int], offsets: list[int], width: int) -> torch.Tensor:
        """(batch, width): the batch-wide index of the word each token belongs to, -1 where it gives no target."""
        index = torch.full((len(encodings), width), -1)
        for row, (encoding, count, offset) in enumerate(zip(encodings, words, offsets, strict=True)):
            for position, word in enumerate(encoding.word_ids[:width]):
                if word is not None and word < count:
                    index[row, position] = offset + word
        return index.to(self.device)

    def losses(self, encoder, texts: list[str]) -> dict[str, torch.Tensor]:
        own_enc = self.tokenizer(texts, return_offsets_mapping=True, verbose=False).encodings
        teacher_enc = self.teacher_tokenizer(texts, return_offsets_mapping=True, verbose=False).encodings
        own = self._batch(self.tokenizer, own_enc)
        shared = self._batch(self.teacher_tokenizer, teacher_enc)
        words = aligned_words(own_enc, teacher_enc, self.recipe.seq_len)
        skipped = sum(w is None for w in words)
        words = [w or 0 for w in words]
        offsets = [sum(words[:i]) for i in range(len(words))]
        total = max(sum(words), 1)
        own_index = self._word_index(own_enc, words, offsets, own["input_ids"].shape[1])
        teacher_index = self._word_index(teacher_enc, words, offsets, shared["input_ids"].shape[1])
        with torch.no_grad():
            teacher = self.teacher(**shared, output_hidden_states=True).hidden_states
        student = encoder(**own, output_hidden_states=True).hidden_states
        hidden = sum(
            F.mse_loss(word_means(s.float(), own_index, total), word_means(t.float(), teacher_index, total))
            for s, t in zip(student, teacher, strict=True)
        )
        target = mean_pool(teacher[-1].float(), shared["attention_mask"])
        embedding = mean_pool(student[-1].float(), own["attention_mask"])
        return {
            "hidden": hidden / len(student),
            "embedding_own": 1 - (embedding * target).sum(-1).mean(),
            "skipped_texts": torch.tensor(float(skipped)),
        }


def covering_words(texts: list[str], tokenizer, rows: set[int], limit: int) -> list[str]:
    """Up to `limit` distinct words of `texts` whose tokenization uses one of `rows`, most frequent first (ties in
    alphabetical order). Words are the tokenizer's own (its normaliser, then its pre-tokenizer), the units word
    alignment matches, so each one read alone as a text is one aligned word: a target at every depth for the rows it
    uses, whether or not a drawn text happens to contain it."""
    normalizer, pre_tokenizer = tokenizer.backend_tokenizer.normalizer, tokenizer.backend_tokenizer.pre_tokenizer
    counts = collections.Counter()
    for text in texts:
        counts.update(word for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
    words = sorted(counts, key=lambda w: (-counts[w], w))
    ids = tokenizer(words, add_special_tokens=False, verbose=False)["input_ids"]
    return [word for word, pieces in zip(words, ids, strict=True) if rows.intersection(pieces)][:limit]


def word_means(hidden: torch.Tensor, index: torch.Tensor, words: int) -> torch.Tensor:
    """(words, hidden): the mean hidden state over the tokens of each word (`index` as `_word_index` builds it)."""
    flat, index = hidden.flatten(0, 1), index.flatten()
    keep = index >= 0
    sums = flat.new_zeros(words, flat.shape[-1]).index_add(0, index[keep], flat[keep])
    counts = torch.bincount(index[keep], minlength=words).clamp(min=1).unsqueeze(-1)
    return sums / counts
