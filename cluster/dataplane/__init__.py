"""The data plane between the engine and the actors: messages, their codec, channels and transports."""
