from rlm_pipelines.text import clip, clip_bytes


def test_clip_keeps_head_and_tail_and_says_how_much_was_cut():
    assert clip("short", 5) == "short"
    text = "a" * 6 + "b" * 5
    assert clip(text, 5) == "aaa\n... [6 characters cut] ...\nbb"
    assert clip(text, 4, note="the rest is in run.json") == "aa\n... [7 characters cut; the rest is in run.json] ...\nbb"
    assert clip(text, 0) == "\n... [11 characters cut] ...\n"  # nothing of the text, never all of it


def test_clip_bytes_counts_bytes():
    assert clip_bytes(b"xy", 2) == b"xy"
    assert clip_bytes("é".encode() * 4, 4) == "é".encode() + b"\n... [4 bytes cut] ...\n" + "é".encode()
