"""Internal helpers shared by every stage: atomic output files (:mod:`.io`) and the thread limits of
numeric work (:mod:`.threads`)."""
