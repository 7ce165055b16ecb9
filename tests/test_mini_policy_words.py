"""A single-subject mini base learns the scene grammar's words without forgetting its own."""

import torch

from cgrpo.data.miniworld import scene_vocabulary, vocabulary
from cgrpo.policy.flux import ReferenceFluxPolicy
from cgrpo.policy.mini import add_words, mini


def test_added_words_get_their_own_ids_and_old_prompts_encode_as_before(tmp_path):
    base, extended = mini(), mini(extra_words=["above", "below", "of", "heart"])
    tokenizer = extended.text_encoder.clip_tokenizer
    above, below = tokenizer(["a heart above a ring", "a heart below a ring"]).input_ids
    assert tokenizer.unk_token_id not in above + below
    assert above != below
    # the committed base read both as the unknown word
    old = base.text_encoder.clip_tokenizer(["a heart above a ring"]).input_ids[0]  # [BOS] a heart above ...
    assert old[3] == base.text_encoder.clip_tokenizer.unk_token_id != above[3]

    prompt = ["a striped heart in the top left on a blue floor"]
    with torch.no_grad():
        for a, b in zip(base.text_encoder(prompt), extended.text_encoder(prompt), strict=True):
            assert torch.equal(a, b)

    extended.save_pretrained(tmp_path)
    loaded = ReferenceFluxPolicy.from_pretrained(tmp_path)
    assert loaded.text_encoder.clip_tokenizer(["a heart above a ring"]).input_ids[0] == above
    assert add_words(loaded, ["above", "heart"]) == []  # nothing new: nothing resized


def test_scene_vocabulary_is_covered_after_adding_the_missing_words():
    policy = mini()
    missing = sorted(set(scene_vocabulary()) - set(vocabulary()))
    assert add_words(policy, missing) == missing
    tokenizer = policy.text_encoder.clip_tokenizer
    ids = tokenizer([" ".join(scene_vocabulary())]).input_ids[0]
    assert tokenizer.unk_token_id not in ids
