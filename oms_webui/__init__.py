"""The AUTOMATIC1111-family glue's decisions on plain values (arguments, where OMS applies, the sampler's start).
No WebUI imports: ``scripts/one_more_step.py`` reads the WebUI's objects into the values these take."""
