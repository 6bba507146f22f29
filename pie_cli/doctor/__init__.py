"""`pie doctor` as a service: what pie runs on (versions, devices, storage, models) and a
self-test on a freshly built tiny model, returned as data.
"""
