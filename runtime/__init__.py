"""Engines that run an exported model from its OUT folder alone, and the `dsc` op set they execute."""
