"""The AUTOMATIC1111-family glue below the script (``scripts/one_more_step.py``): its arguments (``args``), decisions
on plain values (``logic``), settings, what the WebUI tells the OMS runtime (``environment``), memory placement, the
API check and the X/Y/Z axes. ``args`` and ``logic`` import no WebUI module; the others import the WebUI's
``modules`` only inside their functions, and ``api`` needs fastapi, which every WebUI serves its API with."""
