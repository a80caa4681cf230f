# Links build/mipsle/launcher.c against the static libpython of a CPython
# build tree, with the same libraries that tree's own `python` program gets
# (OpenSSL and zlib for the built-in _ssl, _hashlib and zlib modules).
# build-mipsle.sh runs it in that tree as
#   make -f Makefile -f .../launcher.mk printer-connector-launcher \
#       LAUNCHER_SRC=.../launcher.c LAUNCHER_LDSCRIPT=.../discard-pdr.ld
printer-connector-launcher: $(LIBRARY) $(LAUNCHER_SRC) $(LAUNCHER_LDSCRIPT)
	$(CC) -c $(PY_CFLAGS) $(PY_CPPFLAGS) -o printer-connector-launcher.o $(LAUNCHER_SRC)
	$(LINKCC) $(PY_LDFLAGS) -s -Wl,-T,$(LAUNCHER_LDSCRIPT) -o $@ printer-connector-launcher.o $(LIBRARY) $(LIBS) $(MODLIBS) $(SYSLIBS)
