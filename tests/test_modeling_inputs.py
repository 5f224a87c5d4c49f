"""MedEIRModel's input checks and edge cases (modeling_medeir.py): batches that are all padding give zeros on every
backend, and ids of the wrong kind, type or range get a clear error (or, for narrow integer ids, the same result)."""

import numpy as np
import pytest
import torch

from modeling_medeir import MedEIRModel

from .conftest import tiny_config


@pytest.fixture(scope="module")
def model() -> MedEIRModel:
    torch.manual_seed(0)
    return MedEIRModel(tiny_config()).eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_a_batch_of_all_padding_rows_gives_zeros(implementation, dtype):
    torch.manual_seed(0)
    model = MedEIRModel(tiny_config()).eval().to(dtype)
    model.set_attn_implementation(implementation)
    ids = torch.randint(1, 1000, (3, 7))
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=torch.zeros(3, 7, dtype=torch.long), output_hidden_states=True)
    assert out.last_hidden_state.shape == (3, 7, 48) and out.last_hidden_state.dtype == dtype
    assert not out.last_hidden_state.any() and all(not h.any() for h in out.hidden_states)
    assert len(out.hidden_states) == 3


def test_a_batch_with_one_all_padding_row_gives_zeros_there_and_the_same_elsewhere(model):
    ids = torch.randint(1, 1000, (2, 6))
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [0, 0, 0, 0, 0, 0]])
    with torch.no_grad():
        both = model(input_ids=ids, attention_mask=mask).last_hidden_state
        alone = model(input_ids=ids[:1, :4]).last_hidden_state
    assert not both[1].any() and not both[0, 4:].any()
    torch.testing.assert_close(both[0, :4], alone[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.int32])
def test_narrow_integer_ids_give_the_same_result_as_int64(model, dtype):
    ids = torch.randint(1, 250, (2, 5))
    types = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 1, 1]])
    with torch.no_grad():
        expected = model(input_ids=ids, token_type_ids=types).last_hidden_state
        got = model(input_ids=ids.to(dtype), token_type_ids=types.to(dtype)).last_hidden_state
    torch.testing.assert_close(got, expected, atol=0, rtol=0)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"input_ids": [[101, 102]]}, TypeError, "input_ids must be a torch.Tensor, got list"),
        ({"input_ids": np.array([[101, 102]])}, TypeError, "input_ids must be a torch.Tensor, got ndarray"),
        (
            {"input_ids": torch.tensor([[101, 102]]), "attention_mask": [[1, 1]]},
            TypeError,
            "attention_mask must be a torch.Tensor, got list",
        ),
        ({"input_ids": torch.tensor([[1.0, 2.0]])}, TypeError, "input_ids must be an integer tensor"),
        (
            {"input_ids": torch.tensor([[101, 102]]), "token_type_ids": torch.tensor([[0, 2]])},
            ValueError,
            r"token_type_ids contains 2, outside \[0, 2\) \(type_vocab_size is 2\)",
        ),
        (
            {"input_ids": torch.tensor([[101, 102]]), "token_type_ids": torch.tensor([[-1, 0]])},
            ValueError,
            "token_type_ids contains -1",
        ),
        (
            {"input_ids": torch.tensor([[101, 102]]), "token_type_ids": torch.tensor([[0.0, 1.0]])},
            TypeError,
            "token_type_ids must be an integer tensor",
        ),
        (
            {"input_ids": torch.randint(1, 900, (1, 6)), "cu_seq_lens_q": torch.tensor([0, 4, 2, 6])},
            ValueError,
            "cu_seq_lens_q must start at 0 and strictly increase",
        ),
        (
            {"input_ids": torch.randint(1, 900, (1, 6)), "cu_seq_lens_q": torch.tensor([0, 3, 3, 6])},
            ValueError,
            "strictly increase",
        ),
        (
            {"input_ids": torch.randint(1, 900, (1, 6)), "cu_seq_lens_q": torch.tensor([1, 3, 6])},
            ValueError,
            "must start at 0",
        ),
        (
            {"input_ids": torch.randint(1, 900, (1, 6)), "cu_seq_lens_q": torch.tensor([[0, 6]])},
            ValueError,
            r"cu_seq_lens_q must be 1-D",
        ),
        (
            {"input_ids": torch.randint(1, 900, (1, 6)), "cu_seq_lens_q": [0, 6]},
            TypeError,
            "cu_seq_lens_q must be a torch.Tensor",
        ),
    ],
)
def test_bad_inputs_are_clear_errors(model, kwargs, error, message):
    with pytest.raises(error, match=message):
        model(**kwargs)


def test_without_token_type_embeddings_only_zero_types_are_accepted():
    model = MedEIRModel(tiny_config(type_vocab_size=0)).eval()
    ids = torch.randint(1, 900, (1, 4))
    with torch.no_grad():
        torch.testing.assert_close(
            model(input_ids=ids, token_type_ids=torch.zeros_like(ids)).last_hidden_state,
            model(input_ids=ids).last_hidden_state,
        )
    with pytest.raises(ValueError, match=r"outside \[0, 1\) \(type_vocab_size is 0\)"):
        model(input_ids=ids, token_type_ids=torch.ones_like(ids))
