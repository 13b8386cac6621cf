"""placeholder replaced below"""


def create(*a, **k):  # type: ignore
    raise NotImplementedError
