"""The distribution's own name, and the one package of it no other
distribution is likely to install: the console script starts here, so it
can tell a user that ``supervisor``, ``worker`` or ``protocol`` is another
distribution's package before Python fails to import ours
(``gpuvisor.packages``). It also holds ``gpuvisor.testing``, the kit a
mode's author tests a mode with. Everything else lives in those three
packages."""
