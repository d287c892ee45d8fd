"""The data order (sampler.StepSampler): what each process trains on at each step, reproducibly."""

from llama_lora.sampler import StepSampler


def _examples(n):
    return [{"input_ids": [i] * (1 + i % 7), "labels": [i] * (1 + i % 7), "i": i} for i in range(n)]


def test_processes_split_each_global_batch_disjointly_and_completely():
    """world=2: the two ranks' micro-batches of a step are disjoint and together are exactly the global
    batch a single process (world=1, same global size) would train on at that step."""
    examples = _examples(48)
    single = StepSampler(examples, seed=5, micro_batch_size=2, accumulation=4)  # global batch 8
    ranks = [StepSampler(examples, seed=5, micro_batch_size=2, accumulation=2, world=2, rank=r) for r in (0, 1)]
    assert single.steps_per_epoch == ranks[0].steps_per_epoch == 6
    for step in range(1, 2 * single.steps_per_epoch + 1):  # two epochs
        ids = [[e["i"] for mb in s.batches(step) for e in mb] for s in ranks]
        assert all(len(mb) == 2 for s in ranks for mb in s.batches(step))
        assert not set(ids[0]) & set(ids[1])
        assert sorted(ids[0] + ids[1]) == sorted(e["i"] for mb in single.batches(step) for e in mb)


def test_order_is_a_function_of_seed_and_epoch():
    examples = _examples(40)
    a, b = StepSampler(examples, 1, 4, 1), StepSampler(examples, 1, 4, 1)
    assert [a.batches(s) for s in range(1, 21)] == [b.batches(s) for s in range(1, 21)]  # across epochs
    assert a.epoch_order(0) != a.epoch_order(1)  # a new permutation each epoch
    assert StepSampler(examples, 2, 4, 1).epoch_order(0) != a.epoch_order(0)
    assert sorted(a.epoch_order(3)) == list(range(40))
