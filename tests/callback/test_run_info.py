"""The run information's notes: each thing said once, with the latest numbers."""

from __future__ import annotations

from fisher_monitor.callback.writers import RunInfo


def test_notes_differing_only_in_numbers_replace_each_other():
    info = RunInfo("fisher", {})
    first = "probe sub-sampled from 64 to 20 samples to fit the memory budget (1.2 GiB estimated)"
    later = "probe sub-sampled from 64 to 18 samples to fit the memory budget (1.4 GiB estimated)"
    other = "the exact Fisher has 1,000 square-root columns per sample: sketched"
    assert info.add_notes([first, other])
    assert not info.add_notes([first, other])  # nothing new
    assert info.add_notes([later])
    assert info.notes == [later, other]  # in place, latest numbers


def test_notes_naming_different_layers_are_kept_apart():
    """Digits inside names (``features.12``, `` `0` ``, ``layer4.1``) are not numbers."""
    info = RunInfo("fisher", {})
    notes = [
        "layer features.12: the Gram route's accuracy is doubtful",
        "layer features.3: the Gram route's accuracy is doubtful",
        "layer `0` has no kron factors",
        "layer `2` has no kron factors",
        "layer4.1.conv2 is measured by torch.func",
        "layer4.0.conv2 is measured by torch.func",
    ]
    info.add_notes(notes)
    assert info.notes == notes
