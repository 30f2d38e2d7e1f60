# C declarations from OpenSSL 3.0 (<openssl/ssl.h>, <openssl/bio.h>,
# <openssl/err.h>, <openssl/x509.h>) used by the TLS stream; Cython ships
# none.  Only what _tls.pyx calls is declared.  Several of these are macros
# in the headers (SSL_CTX_set_mode, SSL_set_tlsext_host_name, BIO_set_retry_*):
# declared as functions, Cython emits the call and the C compiler expands them.

from libc.stdint cimport uint64_t


cdef extern from "openssl/ssl.h" nogil:
    ctypedef struct SSL_METHOD:
        pass
    ctypedef struct SSL_CTX:
        pass
    ctypedef struct SSL:
        pass
    ctypedef struct SSL_CIPHER:
        pass
    ctypedef struct BIO:
        pass
    ctypedef struct BIO_METHOD:
        pass
    ctypedef struct X509:
        pass
    ctypedef struct X509_STORE_CTX:
        pass
    ctypedef struct X509_VERIFY_PARAM:
        pass
    ctypedef int (*SSL_verify_cb)(int preverify_ok, X509_STORE_CTX *x509_ctx)

    const SSL_METHOD *TLS_server_method()
    const SSL_METHOD *TLS_client_method()

    SSL_CTX *SSL_CTX_new(const SSL_METHOD *method)
    void SSL_CTX_free(SSL_CTX *ctx)
    long SSL_CTX_set_min_proto_version(SSL_CTX *ctx, int version)
    long SSL_CTX_set_max_proto_version(SSL_CTX *ctx, int version)
    uint64_t SSL_CTX_set_options(SSL_CTX *ctx, uint64_t options)
    uint64_t SSL_CTX_clear_options(SSL_CTX *ctx, uint64_t options)
    long SSL_CTX_set_mode(SSL_CTX *ctx, long mode)
    long SSL_CTX_clear_mode(SSL_CTX *ctx, long mode)
    int SSL_CTX_set_num_tickets(SSL_CTX *ctx, size_t num_tickets)
    void SSL_CTX_set_verify(SSL_CTX *ctx, int mode, SSL_verify_cb callback)
    int SSL_CTX_load_verify_locations(SSL_CTX *ctx, const char *CAfile, const char *CApath)
    int SSL_CTX_use_certificate_chain_file(SSL_CTX *ctx, const char *file)
    int SSL_CTX_use_PrivateKey_file(SSL_CTX *ctx, const char *file, int type)
    int SSL_CTX_check_private_key(const SSL_CTX *ctx)

    SSL *SSL_new(SSL_CTX *ctx)
    void SSL_free(SSL *ssl)
    void SSL_set_bio(SSL *ssl, BIO *rbio, BIO *wbio)
    void SSL_set_accept_state(SSL *ssl)
    void SSL_set_connect_state(SSL *ssl)
    void SSL_set_read_ahead(SSL *ssl, int yes)
    void SSL_set_default_read_buffer_len(SSL *ssl, size_t length)
    long SSL_set_tlsext_host_name(SSL *ssl, const char *name)
    X509_VERIFY_PARAM *SSL_get0_param(SSL *ssl)
    int SSL_do_handshake(SSL *ssl)
    int SSL_is_init_finished(const SSL *ssl)
    int SSL_read_ex(SSL *ssl, void *buf, size_t num, size_t *readbytes)
    int SSL_write_ex(SSL *ssl, const void *buf, size_t num, size_t *written)
    int SSL_shutdown(SSL *ssl)
    int SSL_get_error(const SSL *ssl, int ret)
    long SSL_get_verify_result(const SSL *ssl)
    X509 *SSL_get0_peer_certificate(const SSL *ssl)
    const SSL_CIPHER *SSL_get_current_cipher(const SSL *ssl)
    const char *SSL_CIPHER_get_name(const SSL_CIPHER *cipher)

    enum:
        TLS1_3_VERSION
        SSL_FILETYPE_PEM
        SSL_VERIFY_PEER
        SSL_VERIFY_FAIL_IF_NO_PEER_CERT
        SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER
        SSL_MODE_AUTO_RETRY
        SSL_OP_IGNORE_UNEXPECTED_EOF
        SSL_ERROR_NONE
        SSL_ERROR_SSL
        SSL_ERROR_WANT_READ
        SSL_ERROR_WANT_WRITE
        SSL_ERROR_SYSCALL
        SSL_ERROR_ZERO_RETURN
        SSL_R_CERTIFICATE_VERIFY_FAILED
        SSL_R_PEER_DID_NOT_RETURN_A_CERTIFICATE
        SSL_R_UNEXPECTED_EOF_WHILE_READING


cdef extern from "openssl/bio.h" nogil:
    BIO_METHOD *BIO_meth_new(int type, const char *name)
    int BIO_get_new_index()
    int BIO_meth_set_write_ex(
        BIO_METHOD *biom, int (*write)(BIO *, const char *, size_t, size_t *) noexcept nogil
    )
    int BIO_meth_set_read_ex(
        BIO_METHOD *biom, int (*read)(BIO *, char *, size_t, size_t *) noexcept nogil
    )
    int BIO_meth_set_ctrl(
        BIO_METHOD *biom, long (*ctrl)(BIO *, int, long, void *) noexcept nogil
    )
    int BIO_meth_set_create(BIO_METHOD *biom, int (*create)(BIO *) noexcept nogil)
    BIO *BIO_new(const BIO_METHOD *type)
    int BIO_free(BIO *a)
    void BIO_set_data(BIO *a, void *ptr)
    void *BIO_get_data(BIO *a)
    void BIO_set_init(BIO *a, int init)
    void BIO_set_retry_read(BIO *b)
    void BIO_set_retry_write(BIO *b)
    void BIO_clear_retry_flags(BIO *b)

    enum:
        BIO_TYPE_SOURCE_SINK
        BIO_TYPE_DESCRIPTOR
        BIO_CTRL_FLUSH
        BIO_CTRL_EOF


cdef extern from "openssl/err.h" nogil:
    unsigned long ERR_peek_last_error()
    void ERR_clear_error()
    const char *ERR_reason_error_string(unsigned long e)
    int ERR_GET_LIB(unsigned long e)
    int ERR_GET_REASON(unsigned long e)

    enum:
        ERR_LIB_SSL
        ERR_LIB_X509


cdef extern from "openssl/x509.h" nogil:
    int i2d_X509(const X509 *x, unsigned char **out)
    const char *X509_verify_cert_error_string(long n)

    enum:
        X509_V_OK
        X509_V_ERR_HOSTNAME_MISMATCH
        X509_V_ERR_IP_ADDRESS_MISMATCH
        X509_R_KEY_VALUES_MISMATCH
        X509_R_KEY_TYPE_MISMATCH


cdef extern from "openssl/x509_vfy.h" nogil:
    int X509_VERIFY_PARAM_set1_host(X509_VERIFY_PARAM *param, const char *name, size_t namelen)
    int X509_VERIFY_PARAM_set1_ip_asc(X509_VERIFY_PARAM *param, const char *ipasc)
    void X509_VERIFY_PARAM_set_hostflags(X509_VERIFY_PARAM *param, unsigned int flags)


cdef extern from "openssl/x509v3.h" nogil:
    enum:
        X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS
        X509_CHECK_FLAG_NEVER_CHECK_SUBJECT
