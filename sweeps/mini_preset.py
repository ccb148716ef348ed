# A smaller quality preset for timing the executors on a loaded 2-core machine (not a quality result).
from prunelib.measure import scoring

scoring.PRESETS.setdefault("mini", scoring.Preset(("arc_easy", "piqa"), 20, "2 tasks, first 20 documents each"))
