"""Per-sample resize matrices against F.interpolate applied to each sample alone."""

import pytest
import torch
import torch.nn.functional as F

from degsr.degradation.resize import RESIZE_MODES, resize_batch, resize_matrices


@pytest.mark.parametrize("mode", RESIZE_MODES)
@pytest.mark.parametrize("n_in,n_out", [(17, 40), (40, 17), (32, 32), (64, 19), (9, 10), (100, 7)])
def test_matrix_equals_interpolate(mode, n_in, n_out):
    torch.manual_seed(0)
    x = torch.rand(1, 3, n_in, 13, dtype=torch.float64)
    ref = F.interpolate(x, size=(n_out, 13), mode=mode, **({} if mode == "area" else {"align_corners": False}))
    m = resize_matrices(torch.tensor([n_in]), torch.tensor([n_out]), torch.tensor([RESIZE_MODES.index(mode)]),
                        n_in, n_out, torch.float64)[0]
    ours = torch.einsum("oi,bcix->bcox", m, x)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-12)


def test_batch_of_mixed_sizes_and_modes_matches_per_sample_loop():
    torch.manual_seed(1)
    sizes_in = [(40, 30), (25, 33), (40, 40)]
    sizes_out = [(60, 45), (10, 12), (40, 40)]
    modes = [2, 0, 1]
    canvas_in, canvas_out = (40, 40), (64, 48)
    x = torch.rand(3, 3, *canvas_in, dtype=torch.float64)
    out = resize_batch(x, *(torch.tensor([s[k] for s in sizes_in]) for k in (0, 1)),
                       *(torch.tensor([s[k] for s in sizes_out]) for k in (0, 1)),
                       torch.tensor(modes), canvas_out)
    assert out.shape == (3, 3, *canvas_out)
    for b in range(3):
        (hi, wi), (ho, wo), mode = sizes_in[b], sizes_out[b], RESIZE_MODES[modes[b]]
        kw = {} if mode == "area" else {"align_corners": False}
        ref = F.interpolate(x[b:b + 1, :, :hi, :wi], size=(ho, wo), mode=mode, **kw)[0]
        torch.testing.assert_close(out[b, :, :ho, :wo], ref, rtol=0, atol=1e-12)
        # padding replicates the last valid row / column
        torch.testing.assert_close(out[b, :, ho:, :wo], ref[:, -1:, :].expand(-1, 64 - ho, -1))
        torch.testing.assert_close(out[b, :, :ho, wo:], ref[:, :, -1:].expand(-1, -1, 48 - wo))
