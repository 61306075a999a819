"""Views (orchestrator/data/views.py): deterministic, exact integer shifts and flips padded with the background."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from orchestrator.data.views import ViewPolicy, apply_views, background_value, epoch_views, random_views, view_hash, views_of


def _dot_image(h: int = 5, w: int = 5, y: int = 2, x: int = 2) -> torch.Tensor:
    image = torch.zeros(1, 1, h, w, dtype=torch.uint8)
    image[0, 0, y, x] = 255
    return image


def test_grid_enumerates_every_shift_once_with_view_0_untouched():
    policy = ViewPolicy(max_shift=2)
    ids = torch.zeros(25, dtype=torch.int64)
    dx, dy, flip = policy.params(ids, torch.arange(25))
    assert policy.count == 25
    assert (int(dx[0]), int(dy[0]), int(flip[0])) == (0, 0, 0)
    assert sorted(zip(dx.tolist(), dy.tolist())) == sorted((a, b) for a in range(-2, 3) for b in range(-2, 3))


def test_shift_moves_pixels_and_pads_with_fill():
    out = apply_views(_dot_image(), torch.tensor([1]), torch.tensor([-1]), torch.tensor([0]), fill=7, max_shift=2)
    assert out[0, 0, 1, 3] == 255  # right by 1, up by 1
    assert int(out[0, 0].eq(255).sum()) == 1
    assert out[0, 0, :, 0].tolist() == [7] * 5  # the column shifted in is the fill value
    assert out[0, 0, 4, :].tolist() == [7] * 5


def test_flip_mirrors_columns():
    out = apply_views(_dot_image(x=0), torch.tensor([0]), torch.tensor([0]), torch.tensor([1]), fill=0, max_shift=1)
    assert out[0, 0, 2, 4] == 255 and out[0, 0, 2, 0] == 0


def test_views_are_a_function_of_id_and_view_only():
    policy = ViewPolicy(max_shift=3, flip=True, num_views=6, seed=11)
    ids, views = torch.arange(40).repeat_interleave(6), torch.arange(6).repeat(40)
    first = policy.params(ids, views)
    again = policy.params(ids.flip(0), views.flip(0))  # order of the batch does not matter
    for a, b in zip(first, again):
        assert torch.equal(a, b.flip(0))
    # The numpy path (teacher actors) and the torch path (train workers) agree.
    for a, b in zip(first, policy.params(ids.numpy(), views.numpy())):
        np.testing.assert_array_equal(a.numpy(), b)
    # View 0 stays untouched even when views are drawn from the grid.
    assert first[0][views == 0].abs().sum() == 0 and first[2][views == 0].sum() == 0
    # Another policy seed draws other views.
    other = ViewPolicy(max_shift=3, flip=True, num_views=6, seed=12).params(ids, views)
    assert not all(torch.equal(a, b) for a, b in zip(first, other))


def test_views_of_matches_one_image_at_a_time():
    policy = ViewPolicy(max_shift=2, flip=True, fill=3)
    images = torch.randint(0, 256, (8, 2, 6, 7), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    ids, views = torch.arange(8), torch.tensor([0, 5, 9, 17, 24, 31, 40, 49])
    batch = views_of(images, ids, views, policy)
    for row in range(8):
        alone = views_of(images[row : row + 1], ids[row : row + 1], views[row : row + 1], policy)
        assert torch.equal(batch[row : row + 1], alone)
    assert torch.equal(batch[0], images[0])


def test_epoch_views_are_spread_uniformly_and_change_every_epoch():
    ids = torch.arange(50_000)
    first, second = epoch_views(0, 1, ids, 25), epoch_views(0, 2, ids, 25)
    counts = torch.bincount(first, minlength=25)
    assert counts.min() > 1800 and counts.max() < 2200  # 2000 expected per view
    assert float((first == second).float().mean()) < 0.06  # independent epochs: 1/25 = 0.04
    assert torch.equal(first, epoch_views(0, 1, ids, 25))
    assert torch.equal(epoch_views(0, 3, ids, 1), torch.zeros_like(ids))


def test_hash_has_no_arithmetic_runs_over_consecutive_ids():
    values = view_hash(0, torch.arange(1000), torch.zeros(1000, dtype=torch.int64)) % 25
    steps = torch.diff(values) % 25
    assert torch.bincount(steps, minlength=25).max() < 100  # a linear hash would give one step everywhere


def test_random_views_stay_on_the_grid_and_keep_the_pixels():
    policy = ViewPolicy(max_shift=1, fill=0)
    images = _dot_image().repeat(200, 1, 1, 1)
    out = random_views(images, policy, torch.Generator().manual_seed(0))
    assert out.eq(255).sum(dim=(1, 2, 3)).eq(1).all()  # a one-pixel shift of a centred dot never leaves the image
    positions = {tuple(torch.nonzero(o[0] == 255)[0].tolist()) for o in out}
    assert positions == {(y, x) for y in (1, 2, 3) for x in (1, 2, 3)}


def test_background_is_the_most_common_border_value():
    images = np.full((4, 1, 6, 6), 200, dtype=np.uint8)
    images[:, :, 2:4, 2:4] = 9
    assert background_value(images) == 200


@pytest.mark.parametrize("bad", [{"max_shift": -1}, {"fill": 256}, {"max_shift": 1, "num_views": 10}])
def test_bad_policies_are_refused(bad):
    with pytest.raises(ValueError):
        ViewPolicy(**bad)


def test_apply_views_refuses_float_images():
    with pytest.raises(TypeError):
        apply_views(torch.zeros(1, 1, 4, 4), torch.tensor([0]), torch.tensor([0]), torch.tensor([0]), fill=0, max_shift=1)
