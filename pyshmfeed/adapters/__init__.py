"""Thin front ends over a ``Feed``, one module per framework, each importing its framework on first use.

- ``pyshmfeed.adapters.torch``: ``TorchBatches`` (batches of torch tensors on
  a device, staged by ``pyshmfeed.stage``) and ``DataLoader``, a drop-in for
  ``torch.utils.data.DataLoader`` over a map-style dataset (also importable as
  ``pyshmfeed.torch.DataLoader``);
- ``pyshmfeed.adapters.tfdata``: ``dataset(feed)``, a ``tf.data.Dataset``;
- ``pyshmfeed.adapters.jax``: ``batches(feed)``, ``jax.device_put`` with a
  small prefetch.

Import the module you need; this package imports no framework. Each
docstring states how many copies its path makes (see also docs/adapters.md).
"""
