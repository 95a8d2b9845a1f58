//! sdti_trainer_preview: a C host draws what the word does while it trains.
