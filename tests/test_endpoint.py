"""The endpointer turns per-frame VAD probabilities into turns with hysteresis and hangover."""

from edge.endpoint import EndpointConfig, Endpointer, EventKind

CFG = EndpointConfig(threshold_on=0.5, threshold_off=0.35, min_speech_ms=96, hangover_ms=320, max_turn_s=5)


def run(probs, cfg=CFG):
    ep = Endpointer(cfg)
    events = []
    for i, p in enumerate(probs):
        events += ep.push(i, p)
    events += ep.finish(len(probs) - 1)
    return events


def test_a_click_shorter_than_min_speech_opens_no_turn():
    assert run([0.0] * 5 + [0.9, 0.9] + [0.0] * 20) == []


def test_speech_opens_at_its_first_frame_and_ends_after_the_hangover():
    events = run([0.0] * 5 + [0.9] * 20 + [0.0] * 30)
    assert [e.kind for e in events] == [EventKind.SPEECH_START, EventKind.SPEECH_END]
    start, end = events
    assert start.frame == 5 and start.decided_at == 7  # 3 frames of min speech
    assert end.frame == 24  # last speech frame
    assert end.decided_at == 24 + CFG.frames(CFG.hangover_ms)  # decided after the hangover


def test_dips_between_off_and_on_threshold_do_not_split_a_turn():
    probs = [0.9] * 10 + [0.4] * 15 + [0.9] * 10 + [0.0] * 20  # 0.4 is above threshold_off
    events = run(probs)
    assert [e.kind for e in events] == [EventKind.SPEECH_START, EventKind.SPEECH_END]


def test_a_pause_shorter_than_the_hangover_keeps_one_turn_a_longer_one_makes_two():
    short = [0.9] * 10 + [0.0] * 8 + [0.9] * 10 + [0.0] * 20
    long = [0.9] * 10 + [0.0] * 15 + [0.9] * 10 + [0.0] * 20
    assert len(run(short)) == 2
    assert [e.kind for e in run(long)] == [EventKind.SPEECH_START, EventKind.SPEECH_END] * 2


def test_an_endless_speech_is_cut_at_max_turn_length():
    events = run([0.9] * 400)
    ends = [e for e in events if e.kind is EventKind.SPEECH_END]
    assert ends[0].forced
    assert ends[0].frame - events[0].frame + 1 == CFG.frames(CFG.max_turn_s * 1000)


def test_end_of_stream_closes_an_open_turn():
    events = run([0.9] * 10)
    assert [e.kind for e in events] == [EventKind.SPEECH_START, EventKind.SPEECH_END]
