"""Stage interfaces and their implementations (VAD, ASR, LLM, TTS, wake word)."""
