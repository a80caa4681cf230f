/*
 * Entry point of printer-connector-linux-mipsle.
 *
 * The executable is a static CPython (interpreter, C extension modules,
 * OpenSSL and zlib all linked in) followed by a zip archive holding the
 * compiled standard library, the pure-Python dependencies and connector.py.
 * This program points the interpreter at that archive (its own file) and
 * runs the archive's __main__ module, which starts connector.py.
 *
 * The interpreter is isolated from the device's environment: PYTHONHOME,
 * PYTHONPATH and the printer's own Python installation are never consulted,
 * so a firmware update that changes or removes the system Python does not
 * affect it. PYTHONUNBUFFERED is the one variable honoured, because log
 * collectors reading stdout through a pipe rely on it.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static int
self_path(char *buf, size_t size)
{
    ssize_t n = readlink("/proc/self/exe", buf, size - 1);

    if (n <= 0 || (size_t)n >= size - 1) {
        return -1;
    }
    buf[n] = '\0';
    return 0;
}

static int
exit_with(PyConfig *config, PyStatus status)
{
    PyConfig_Clear(config);
    if (PyStatus_IsExit(status)) {
        return status.exitcode;
    }
    Py_ExitStatusException(status);
    return 1; /* not reached */
}

int
main(int argc, char **argv)
{
    char exe[PATH_MAX];
    const char *unbuffered = getenv("PYTHONUNBUFFERED");
    PyPreConfig preconfig;
    PyConfig config;
    PyStatus status;
    wchar_t *wexe;

    if (self_path(exe, sizeof(exe)) != 0) {
        fprintf(stderr, "printer-connector: cannot read /proc/self/exe\n");
        return 1;
    }

    PyPreConfig_InitIsolatedConfig(&preconfig);
    preconfig.utf8_mode = 1;
    status = Py_PreInitialize(&preconfig);
    if (PyStatus_Exception(status)) {
        Py_ExitStatusException(status);
    }

    PyConfig_InitIsolatedConfig(&config);
    config.pathconfig_warnings = 0;
    config.write_bytecode = 0;
    config.install_signal_handlers = 1;
    if (unbuffered != NULL && unbuffered[0] != '\0') {
        config.buffered_stdio = 0;
    }

    status = PyConfig_SetBytesArgv(&config, argc, argv);
    if (PyStatus_Exception(status)) {
        return exit_with(&config, status);
    }
    status = PyConfig_SetBytesString(&config, &config.executable, exe);
    if (PyStatus_Exception(status)) {
        return exit_with(&config, status);
    }
    status = PyConfig_SetBytesString(&config, &config.run_filename, exe);
    if (PyStatus_Exception(status)) {
        return exit_with(&config, status);
    }

    wexe = Py_DecodeLocale(exe, NULL);
    if (wexe == NULL) {
        fprintf(stderr, "printer-connector: cannot decode %s\n", exe);
        PyConfig_Clear(&config);
        return 1;
    }
    config.module_search_paths_set = 1;
    status = PyWideStringList_Append(&config.module_search_paths, wexe);
    PyMem_RawFree(wexe);
    if (PyStatus_Exception(status)) {
        return exit_with(&config, status);
    }

    status = Py_InitializeFromConfig(&config);
    if (PyStatus_Exception(status)) {
        return exit_with(&config, status);
    }
    PyConfig_Clear(&config);
    return Py_RunMain();
}
