"""The synthetic engine's answers: deterministic words, a function of the job alone.

In shared so that what a client must receive can be known outside the worker (tests,
``tokenbus chaos``) without importing it.
"""

from __future__ import annotations

import hashlib
import random

from shared.protocol import Job

# Whitespace-free words, so token boundaries in a published prefix are unambiguous.
_WORD_LIST = """
    the of and to in is that it was for on are as with his they at be this from have or by
    one had not but what all were when we there can an your which their said if do will each
    about how up out them then she many some so these would other into has more her two like
    him see time could no make than first been its who now people my made over did down only
    way find use may water long little very after words called just where most know get
    through back much before go good new write our used me man too any day same right look
    think also around another came come work three word must because does part even place
    well such here take why things help put years different away again off went old number
    great tell men say small every found still between name should home big give air line set
    own under read last never us left end along while might next sound below saw something
    thought both few those always looked show large often together asked house world going
    want school important until form food keep children feet land side without boy once
    animals life enough took sometimes four head above kind began almost live page got earth
    need far hand high year mother light parts country father let night following picture
    being study second eyes soon times story boys since white days ever paper hard near
    sentence better best across during today others however sure means knew itself young
    """
WORDS: tuple[str, ...] = tuple(_WORD_LIST.split())
_WORD_ID = {word: i for i, word in enumerate(WORDS)}


def token_id(token: str) -> int:
    """A synthetic token's id: its word's place in WORDS."""
    return _WORD_ID[token.lstrip()]


def _seed(job: Job) -> int:
    # A sampling seed makes the answer depend on the prompt alone, as it would with a model.
    source = str(job.sampling.seed) if job.sampling.seed is not None else job.id
    if job.prompt is not None:
        prompt = job.prompt
    else:
        prompt = "\n".join(f"{m.role}:{m.content}" for m in job.messages or ())
    digest = hashlib.sha256(f"{source}\0{prompt}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def synthetic_text(job: Job, n_tokens: int) -> list[str]:
    """The first ``n_tokens`` tokens of ``job``'s answer: words, all but the first after a space."""
    rng = random.Random(_seed(job))
    return [(" " if i else "") + rng.choice(WORDS) for i in range(n_tokens)]
