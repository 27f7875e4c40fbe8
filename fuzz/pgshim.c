/*
 * pgshim.c: the few parts of the Postgres backend that the providers' code
 * uses, for running it outside a server (the fuzz harnesses).
 *
 * Memory contexts are arenas: every palloc'd chunk is a separate malloc, so
 * AddressSanitizer sees each overflow, double pfree and use after pfree, and
 * resetting an arena frees all its chunks, as MemoryContextReset does.
 * ereport(ERROR) longjmps to the nearest PG_TRY as in the server; error
 * strings live in an error arena that FlushErrorState empties, as the
 * server's ErrorContext, so keeping a pointer into an error after flushing
 * it is caught. Behaviour the server would treat as a crash (PANIC, FATAL,
 * an error with no PG_TRY to catch it, error stack overflow) aborts.
 */
#include "postgres.h"

#include <stdarg.h>

#include "lib/stringinfo.h"
#include "mb/pg_wchar.h"
#include "miscadmin.h"
#include "nodes/pg_list.h"
#include "utils/array.h"
#include "utils/builtins.h"

#include "pgshim.h"

/* utils/memutils.h (not included: it defines the real MemoryContextData) */
#define MaxAllocSize	((Size) 0x3fffffff)
#define AllocSizeIsValid(size)	((Size) (size) <= MaxAllocSize)

/* ---------- memory ---------- */

typedef struct Chunk
{
	struct Chunk *prev;
	struct Chunk *next;
	struct MemoryContextData *arena;
	size_t		size;
	/* keep the payload maximally aligned */
	long double align[FLEXIBLE_ARRAY_MEMBER];
} Chunk;

struct MemoryContextData
{
	const char *name;
	Chunk	   *chunks;
	size_t		nchunks;
};

static struct MemoryContextData top_arena = {"fuzz input"};
static struct MemoryContextData step_arena = {"fuzz step"};
static struct MemoryContextData error_arena = {"fuzz error"};

MemoryContext CurrentMemoryContext = &top_arena;
MemoryContext TopMemoryContext = &top_arena;
MemoryContext ErrorContext = &error_arena;

MemoryContext
fuzz_top_arena(void)
{
	return &top_arena;
}

MemoryContext
fuzz_step_arena(void)
{
	return &step_arena;
}

#define CHUNK_OF(ptr) ((Chunk *) ((char *) (ptr) - offsetof(Chunk, align)))

static void *
arena_alloc(MemoryContext arena, Size size, bool zero)
{
	Chunk	   *c;

	if (arena == NULL)
	{
		fprintf(stderr, "pgshim: palloc with no current memory context\n");
		abort();
	}
	if (!AllocSizeIsValid(size))
		elog(ERROR, "invalid memory alloc request size %zu", (size_t) size);
	c = malloc(offsetof(Chunk, align) + size);
	if (c == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_OUT_OF_MEMORY),
				 errmsg("out of memory"),
				 errdetail("Failed on request of size %zu.", (size_t) size)));
	c->arena = arena;
	c->size = size;
	c->prev = NULL;
	c->next = arena->chunks;
	if (arena->chunks)
		arena->chunks->prev = c;
	arena->chunks = c;
	arena->nchunks++;
	if (zero)
		memset(c->align, 0, size);
	return c->align;
}

static void
chunk_unlink(Chunk *c)
{
	MemoryContext arena = c->arena;

	if (c->prev)
		c->prev->next = c->next;
	else
		arena->chunks = c->next;
	if (c->next)
		c->next->prev = c->prev;
	arena->nchunks--;
}

void
fuzz_arena_reset(MemoryContext arena)
{
	Chunk	   *c = arena->chunks;

	while (c)
	{
		Chunk	   *next = c->next;

		free(c);
		c = next;
	}
	arena->chunks = NULL;
	arena->nchunks = 0;
}

void *
palloc(Size size)
{
	return arena_alloc(CurrentMemoryContext, size, false);
}

void *
palloc0(Size size)
{
	return arena_alloc(CurrentMemoryContext, size, true);
}

void *
palloc_extended(Size size, int flags)
{
	return arena_alloc(CurrentMemoryContext, size, (flags & MCXT_ALLOC_ZERO) != 0);
}

void *
MemoryContextAlloc(MemoryContext context, Size size)
{
	return arena_alloc(context, size, false);
}

void *
MemoryContextAllocZero(MemoryContext context, Size size)
{
	return arena_alloc(context, size, true);
}

void
pfree(void *pointer)
{
	Chunk	   *c = CHUNK_OF(pointer);

	chunk_unlink(c);
	free(c);
}

void *
repalloc(void *pointer, Size size)
{
	Chunk	   *c = CHUNK_OF(pointer);
	MemoryContext arena = c->arena;
	void	   *copy;

	if (!AllocSizeIsValid(size))
		elog(ERROR, "invalid memory alloc request size %zu", (size_t) size);
	copy = arena_alloc(arena, size, false);
	memcpy(copy, pointer, Min(size, c->size));
	pfree(pointer);
	return copy;
}

char *
MemoryContextStrdup(MemoryContext context, const char *string)
{
	size_t		len = strlen(string) + 1;
	char	   *copy = arena_alloc(context, len, false);

	memcpy(copy, string, len);
	return copy;
}

char *
pstrdup(const char *in)
{
	return MemoryContextStrdup(CurrentMemoryContext, in);
}

char *
pnstrdup(const char *in, Size len)
{
	char	   *out;

	len = strnlen(in, len);
	out = palloc(len + 1);
	memcpy(out, in, len);
	out[len] = '\0';
	return out;
}

char *
pchomp(const char *in)
{
	size_t		n = strlen(in);

	while (n > 0 && in[n - 1] == '\n')
		n--;
	return pnstrdup(in, n);
}

void
MemoryContextReset(MemoryContext context)
{
	fuzz_arena_reset(context);
}

/* ---------- formatting (psprintf.c) ---------- */

size_t
pvsnprintf(char *buf, size_t len, const char *fmt, va_list args)
{
	int			nprinted;

	nprinted = vsnprintf(buf, len, fmt, args);	/* pg_vsnprintf, as in the server */
	if (unlikely(nprinted < 0))
		elog(ERROR, "vsnprintf failed: %m with format string \"%s\"", fmt);
	if ((size_t) nprinted < len)
		return (size_t) nprinted;
	if ((size_t) nprinted >= MaxAllocSize - 1)
		ereport(ERROR,
				(errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
				 errmsg("out of memory")));
	return nprinted + 1;
}

char *
psprintf(const char *fmt,...)
{
	int			save_errno = errno;
	size_t		len = 128;

	for (;;)
	{
		char	   *result;
		va_list		args;
		size_t		newlen;

		result = palloc(len);
		errno = save_errno;
		va_start(args, fmt);
		newlen = pvsnprintf(result, len, fmt, args);
		va_end(args);
		if (newlen < len)
			return result;
		pfree(result);
		len = newlen;
	}
}

/* ---------- StringInfo (stringinfo.c) ---------- */

StringInfo
makeStringInfo(void)
{
	StringInfo	res = palloc(sizeof(StringInfoData));

	initStringInfo(res);
	return res;
}

void
initStringInfo(StringInfo str)
{
	int			size = 1024;

	str->data = palloc(size);
	str->maxlen = size;
	resetStringInfo(str);
}

void
resetStringInfo(StringInfo str)
{
	str->data[0] = '\0';
	str->len = 0;
	str->cursor = 0;
}

void
enlargeStringInfo(StringInfo str, int needed)
{
	int			newlen;

	if (needed < 0)
		elog(ERROR, "invalid string enlargement request size: %d", needed);
	if (((Size) needed) >= (MaxAllocSize - (Size) str->len))
		ereport(ERROR,
				(errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
				 errmsg("out of memory"),
				 errdetail("Cannot enlarge string buffer containing %d bytes by %d more bytes.",
						   str->len, needed)));
	needed += str->len + 1;
	if (needed <= str->maxlen)
		return;
	newlen = 2 * str->maxlen;
	while (needed > newlen)
		newlen = 2 * newlen;
	if (newlen > (int) MaxAllocSize)
		newlen = (int) MaxAllocSize;
	str->data = repalloc(str->data, newlen);
	str->maxlen = newlen;
}

int
appendStringInfoVA(StringInfo str, const char *fmt, va_list args)
{
	int			avail;
	size_t		nprinted;

	avail = str->maxlen - str->len;
	if (avail < 16)
		return 32;
	nprinted = pvsnprintf(str->data + str->len, (size_t) avail, fmt, args);
	if (nprinted < (size_t) avail)
	{
		str->len += (int) nprinted;
		return 0;
	}
	str->data[str->len] = '\0';
	return (int) nprinted;
}

void
appendStringInfo(StringInfo str, const char *fmt,...)
{
	int			save_errno = errno;

	for (;;)
	{
		va_list		args;
		int			needed;

		errno = save_errno;
		va_start(args, fmt);
		needed = appendStringInfoVA(str, fmt, args);
		va_end(args);
		if (needed == 0)
			break;
		enlargeStringInfo(str, needed);
	}
}

void
appendBinaryStringInfo(StringInfo str, const char *data, int datalen)
{
	enlargeStringInfo(str, datalen);
	memcpy(str->data + str->len, data, datalen);
	str->len += datalen;
	str->data[str->len] = '\0';
}

void
appendBinaryStringInfoNT(StringInfo str, const char *data, int datalen)
{
	enlargeStringInfo(str, datalen);
	memcpy(str->data + str->len, data, datalen);
	str->len += datalen;
}

void
appendStringInfoString(StringInfo str, const char *s)
{
	appendBinaryStringInfo(str, s, strlen(s));
}

void
appendStringInfoChar(StringInfo str, char ch)
{
	if (str->len + 1 >= str->maxlen)
		enlargeStringInfo(str, 1);
	str->data[str->len] = ch;
	str->len++;
	str->data[str->len] = '\0';
}

void
appendStringInfoSpaces(StringInfo str, int count)
{
	if (count > 0)
	{
		enlargeStringInfo(str, count);
		while (--count >= 0)
			str->data[str->len++] = ' ';
		str->data[str->len] = '\0';
	}
}

/* ---------- List (list.c), pointer lists only ---------- */

#define LIST_HEADER_OVERHEAD \
	((int) ((offsetof(List, initial_elements) - 1) / sizeof(ListCell) + 1))

static List *
new_list(NodeTag type, int min_size)
{
	List	   *newlist;
	int			max_size = Max(min_size, 5);

	newlist = palloc(offsetof(List, initial_elements) + max_size * sizeof(ListCell));
	newlist->type = type;
	newlist->length = min_size;
	newlist->max_length = max_size;
	newlist->elements = newlist->initial_elements;
	return newlist;
}

static void
enlarge_list(List *list, int min_size)
{
	int			new_max_len = Max(16, min_size * 2);

	if (list->elements == list->initial_elements)
	{
		list->elements = MemoryContextAlloc(CHUNK_OF(list)->arena, new_max_len * sizeof(ListCell));
		memcpy(list->elements, list->initial_elements, list->length * sizeof(ListCell));
	}
	else
		list->elements = repalloc(list->elements, new_max_len * sizeof(ListCell));
	list->max_length = new_max_len;
}

List *
list_make1_impl(NodeTag t, ListCell datum1)
{
	List	   *list = new_list(t, 1);

	list->elements[0] = datum1;
	return list;
}

List *
list_make2_impl(NodeTag t, ListCell datum1, ListCell datum2)
{
	List	   *list = new_list(t, 2);

	list->elements[0] = datum1;
	list->elements[1] = datum2;
	return list;
}

List *
list_make3_impl(NodeTag t, ListCell datum1, ListCell datum2, ListCell datum3)
{
	List	   *list = new_list(t, 3);

	list->elements[0] = datum1;
	list->elements[1] = datum2;
	list->elements[2] = datum3;
	return list;
}

List *
list_make4_impl(NodeTag t, ListCell datum1, ListCell datum2, ListCell datum3, ListCell datum4)
{
	List	   *list = new_list(t, 4);

	list->elements[0] = datum1;
	list->elements[1] = datum2;
	list->elements[2] = datum3;
	list->elements[3] = datum4;
	return list;
}

List *
list_make5_impl(NodeTag t, ListCell datum1, ListCell datum2, ListCell datum3, ListCell datum4,
				ListCell datum5)
{
	List	   *list = new_list(t, 5);

	list->elements[0] = datum1;
	list->elements[1] = datum2;
	list->elements[2] = datum3;
	list->elements[3] = datum4;
	list->elements[4] = datum5;
	return list;
}

List *
lappend(List *list, void *datum)
{
	if (list == NIL)
		list = new_list(T_List, 1);
	else
	{
		if (list->length >= list->max_length)
			enlarge_list(list, list->length + 1);
		list->length++;
	}
	lfirst(&list->elements[list->length - 1]) = datum;
	return list;
}

void
list_free(List *list)
{
	if (list == NIL)
		return;
	if (list->elements != list->initial_elements)
		pfree(list->elements);
	pfree(list);
}

/* ---------- errors (elog.c) ---------- */

#define ERRORDATA_STACK_SIZE  5

sigjmp_buf *PG_exception_stack = NULL;
ErrorContextCallback *error_context_stack = NULL;

static ErrorData errordata[ERRORDATA_STACK_SIZE];
static int	errordata_stack_depth = -1;
static int	recursion_depth = 0;

bool		fuzz_verbose = false;
void		(*fuzz_log_hook) (ErrorData *edata) = NULL;

static void
die(const char *what, const char *message)
{
	fprintf(stderr, "pgshim: %s%s%s\n", what, message ? ": " : "", message ? message : "");
	abort();
}

bool
errstart(int elevel, const char *domain)
{
	ErrorData  *edata;

	if (elevel >= FATAL)
		die("FATAL or PANIC raised (a crash in the server)", NULL);
	if (elevel < ERROR && elevel != LOG && elevel != WARNING && elevel != NOTICE && !fuzz_verbose)
		return false;			/* DEBUG, INFO: not shown, arguments not evaluated */
	if (recursion_depth++ > 0 && elevel >= ERROR)
		die("error raised while reporting an error", NULL);
	if (++errordata_stack_depth >= ERRORDATA_STACK_SIZE)
	{
		errordata_stack_depth = -1;
		die("ERRORDATA_STACK_SIZE exceeded (a PANIC in the server)", NULL);
	}
	edata = &errordata[errordata_stack_depth];
	memset(edata, 0, sizeof(ErrorData));
	edata->elevel = elevel;
	edata->domain = domain;
	edata->sqlerrcode = elevel >= ERROR ? ERRCODE_INTERNAL_ERROR : ERRCODE_SUCCESSFUL_COMPLETION;
	edata->saved_errno = errno;
	edata->assoc_context = ErrorContext;
	recursion_depth--;
	return true;
}

bool
errstart_cold(int elevel, const char *domain)
{
	return errstart(elevel, domain);
}

void
errfinish(const char *filename, int lineno, const char *funcname)
{
	ErrorData  *edata = &errordata[errordata_stack_depth];
	int			elevel = edata->elevel;

	edata->filename = filename;
	edata->lineno = lineno;
	edata->funcname = funcname;
	if (elevel >= ERROR)
	{
		if (PG_exception_stack == NULL)
			die("ERROR with no PG_TRY to catch it", edata->message);
		recursion_depth = 0;
		siglongjmp(*PG_exception_stack, 1);
	}
	if (fuzz_log_hook)
		fuzz_log_hook(edata);
	if (fuzz_verbose)
		fprintf(stderr, "pgshim %s: %s%s%s\n", elevel == LOG ? "LOG" : elevel == WARNING ? "WARNING" : "NOTICE",
				edata->message ? edata->message : "",
				edata->detail ? " DETAIL: " : "", edata->detail ? edata->detail : "");
	errordata_stack_depth--;
}

static char *
error_vformat(const char *fmt, va_list args)
{
	MemoryContext old = CurrentMemoryContext;
	StringInfoData buf;

	CurrentMemoryContext = ErrorContext;
	initStringInfo(&buf);
	for (;;)
	{
		va_list		copy;
		int			needed;

		va_copy(copy, args);
		needed = appendStringInfoVA(&buf, fmt, copy);
		va_end(copy);
		if (needed == 0)
			break;
		enlargeStringInfo(&buf, needed);
	}
	CurrentMemoryContext = old;
	return buf.data;
}

#define ERROR_FIELD(field) \
	do { \
		va_list		args; \
		ErrorData  *edata = &errordata[errordata_stack_depth]; \
		errno = edata->saved_errno; \
		va_start(args, fmt); \
		edata->field = error_vformat(fmt, args); \
		va_end(args); \
	} while (0)

int
errcode(int sqlerrcode)
{
	errordata[errordata_stack_depth].sqlerrcode = sqlerrcode;
	return 0;
}

int
errmsg(const char *fmt,...)
{
	ERROR_FIELD(message);
	errordata[errordata_stack_depth].message_id = fmt;
	return 0;
}

int
errmsg_internal(const char *fmt,...)
{
	ERROR_FIELD(message);
	errordata[errordata_stack_depth].message_id = fmt;
	return 0;
}

int
errdetail(const char *fmt,...)
{
	ERROR_FIELD(detail);
	return 0;
}

int
errdetail_internal(const char *fmt,...)
{
	ERROR_FIELD(detail);
	return 0;
}

int
errhint(const char *fmt,...)
{
	ERROR_FIELD(hint);
	return 0;
}

int
errcontext_msg(const char *fmt,...)
{
	ERROR_FIELD(context);
	return 0;
}

int
set_errcontext_domain(const char *domain)
{
	return 0;
}

/* elog(): the server's elog is ereport with errmsg_internal. */
void
elog_start(const char *filename, int lineno, const char *funcname)
{
}

void
pg_re_throw(void)
{
	if (PG_exception_stack == NULL)
		die("PG_RE_THROW with no PG_TRY to catch it",
			errordata_stack_depth >= 0 ? errordata[errordata_stack_depth].message : NULL);
	siglongjmp(*PG_exception_stack, 1);
}

static char *
copy_string(const char *s)
{
	return s ? pstrdup(s) : NULL;
}

ErrorData *
CopyErrorData(void)
{
	ErrorData  *edata = &errordata[errordata_stack_depth];
	ErrorData  *newedata;

	if (errordata_stack_depth < 0)
		die("CopyErrorData with no error", NULL);
	if (CurrentMemoryContext == ErrorContext)
		die("CopyErrorData in the error context", NULL);
	newedata = palloc(sizeof(ErrorData));
	memcpy(newedata, edata, sizeof(ErrorData));
	newedata->message = copy_string(edata->message);
	newedata->detail = copy_string(edata->detail);
	newedata->detail_log = copy_string(edata->detail_log);
	newedata->hint = copy_string(edata->hint);
	newedata->context = copy_string(edata->context);
	newedata->backtrace = NULL;
	newedata->schema_name = newedata->table_name = newedata->column_name = NULL;
	newedata->datatype_name = newedata->constraint_name = NULL;
	newedata->internalquery = NULL;
	newedata->assoc_context = CurrentMemoryContext;
	return newedata;
}

void
FreeErrorData(ErrorData *edata)
{
	if (edata->message)
		pfree(edata->message);
	if (edata->detail)
		pfree(edata->detail);
	if (edata->hint)
		pfree(edata->hint);
	if (edata->context)
		pfree(edata->context);
	pfree(edata);
}

void
FlushErrorState(void)
{
	errordata_stack_depth = -1;
	recursion_depth = 0;
	fuzz_arena_reset(ErrorContext);
}

ErrorData *
fuzz_current_error(void)
{
	return errordata_stack_depth >= 0 ? &errordata[errordata_stack_depth] : NULL;
}

int
fuzz_error_depth(void)
{
	return errordata_stack_depth + 1;
}

/* ---------- stack depth (postgres.c) ---------- */

static char *stack_base = NULL;
#define FUZZ_MAX_STACK_DEPTH (2 * 1024 * 1024)	/* max_stack_depth's default, 2MB */

void
fuzz_set_stack_base(void)
{
	char		here;

	stack_base = &here;
}

void
check_stack_depth(void)
{
	char		here;

	if (stack_base && labs((long) (stack_base - &here)) > FUZZ_MAX_STACK_DEPTH)
		ereport(ERROR,
				(errcode(ERRCODE_STATEMENT_TOO_COMPLEX),
				 errmsg("stack depth limit exceeded")));
}

/* ---------- encoding (mbutils.c, wchar.c): the database is UTF8 ---------- */

static int
utf8_mblen(const unsigned char *s)
{
	if ((*s & 0x80) == 0)
		return 1;
	else if ((*s & 0xe0) == 0xc0)
		return 2;
	else if ((*s & 0xf0) == 0xe0)
		return 3;
	else if ((*s & 0xf8) == 0xf0)
		return 4;
	return 1;
}

int
pg_mblen(const char *mbstr)
{
	return utf8_mblen((const unsigned char *) mbstr);
}

int
pg_mbcliplen(const char *mbstr, int len, int limit)
{
	int			clen = 0;
	int			l;

	while (len > 0 && *mbstr)
	{
		l = pg_mblen(mbstr);
		if ((clen + l) > limit)
			break;
		clen += l;
		if (clen == limit)
			break;
		len -= l;
		mbstr += l;
	}
	return clen;
}

int
GetDatabaseEncoding(void)
{
	return PG_UTF8;
}

/* ---------- text values and arrays (records.c) ---------- */

text *
cstring_to_text_with_len(const char *s, int len)
{
	text	   *result = (text *) palloc(len + VARHDRSZ);

	SET_VARSIZE(result, len + VARHDRSZ);
	memcpy(VARDATA(result), s, len);
	return result;
}

text *
cstring_to_text(const char *s)
{
	return cstring_to_text_with_len(s, strlen(s));
}

/* the harness only makes plain 4-byte-header texts: nothing to detoast */
struct varlena *
pg_detoast_datum_packed(struct varlena *datum)
{
	return datum;
}

char *
text_to_cstring(const text *t)
{
	return pnstrdup(VARDATA_ANY(t), VARSIZE_ANY_EXHDR(t));
}

/* Pages are never stored here: building a statement's arrays is the store's business. */
ArrayType *
construct_md_array(Datum *elems, bool *nulls, int ndims, int *dims, int *lbs,
				   Oid elmtype, int elmlen, bool elmbyval, char elmalign)
{
	die("construct_md_array", "not available in the fuzz harness");
	return NULL;
}
