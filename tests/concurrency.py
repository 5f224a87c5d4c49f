"""Running one callable from several threads at once, for the tests of code that serves concurrent requests."""

import threading
from collections.abc import Callable


def answers_from_threads(call: Callable, requests: list, workers: int) -> dict[int, object]:
    """`call(request)` for every request, `workers` threads starting together and taking every `workers`-th request:
    each answer, or the exception it raised, by the request's index."""
    results: dict[int, object] = {}
    start = threading.Barrier(workers)

    def worker(k: int) -> None:
        start.wait()
        for i in range(k, len(requests), workers):
            try:
                results[i] = call(requests[i])
            except Exception as err:  # recorded; the test asserts on it
                results[i] = err

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results
