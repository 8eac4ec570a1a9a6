"""One session used from several threads: generate calls take turns (a lock in Session.generate), and each gets
exactly what it gets alone."""

import threading

import torch
from util import prompt_for

import vlcache
from vlcache import testing
from vlcache.policies import H2O


def test_one_session_from_two_threads_gives_each_call_its_own_answer():
    model = testing.build("llava")  # not the shared fixture: this test runs generate from threads
    examples = [testing.make_inputs(model, prompt_for("llava"), seed=s).inputs for s in range(2)]
    with vlcache.compress(model, H2O(budget=0.5)) as session:
        want = [model.generate(**x, max_new_tokens=6, do_sample=False) for x in examples]
        got, errors = {}, []

        def work(t):
            try:
                for i in range(6):
                    got[t, i] = model.generate(**examples[(t + i) % 2], max_new_tokens=6, do_sample=False)
            except Exception as e:  # reported below, with the thread
                errors.append(f"thread {t}: {type(e).__name__}: {e}")

        threads = [threading.Thread(target=work, args=(t,)) for t in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    assert not errors, errors[:3]
    assert len(got) == 12
    for (t, i), out in got.items():
        assert torch.equal(out, want[(t + i) % 2])
    assert session.stats is not None
