-- FEEDBACK: one answer's signal (R.signal, batcher.admission.feedback.Signal.encode()).
local decreased = apply_feedback(R.signal)
save(horizon())
return reply(0, 0, decreased)
