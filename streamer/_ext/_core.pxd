# Declarations of the compiled matching core. See _core.pyx for the design.
from cpython.object cimport PyObject
from libc.stdint cimport uint8_t, uint32_t, uint64_t


cdef struct Group:
    uint32_t *atoms       # sorted ids of the residual atoms all entries share
    uint32_t natoms
    uint64_t *refs        # entries, see ENTRY_* in _core.pyx
    uint32_t n
    uint32_t cap


cdef struct Posting:
    Group *groups
    uint32_t ngroups
    uint32_t gcap
    uint32_t total        # entries over all groups; when free, the next free one
    uint8_t elem          # the key lives in the PathIndex's elem dict
    PyObject *owner       # owned: the PathIndex whose dict maps key -> posting
                          # (None: a collection's always-posting; NULL: free)
    PyObject *key         # owned


cdef struct RangeArr:
    double *keys
    uint64_t *entries
    uint32_t n
    uint32_t cap


# Arrays of one element are stored inline (``*0`` fields, the pointer NULL):
# most subscriptions have one clause, one access key and at most one residual
# atom, and a malloc per field would cost time and ~32 bytes each.
cdef struct Clause:
    uint32_t slot         # when free, the next free clause
    uint32_t natoms
    uint32_t atom0
    uint32_t *atoms       # when natoms > 1; see clause_atoms()
    uint8_t kind          # ACCESS_* constant
    uint8_t range_op      # for ACCESS_RANGE: OP_LT..OP_GE
    uint32_t nhandles
    uint32_t handle0
    uint32_t *handles     # when nhandles > 1: posting handles, or a range id
    double threshold      # for ACCESS_RANGE
    uint64_t entry        # the reference postings or range arrays hold


cdef struct Slot:
    uint32_t nclauses
    uint32_t clause0      # when free, the next free slot
    uint32_t *clauses     # when nclauses > 1; see slot_clauses()
    PyObject *id          # owned; NULL for a free slot
    uint32_t owner        # the caller's tag (a gateway), reported with matches
    uint32_t coll         # its CollIndex's number (Core.coll_table)


cdef class Ctx:
    cdef object doc
    cdef object doc_id
    cdef object view
    cdef dict bindings
    cdef uint32_t epoch
    cdef uint32_t npaths
    cdef uint32_t *path_epoch
    cdef void **path_vals
    cdef list path_comps

    cdef object path_value(self, uint32_t pid)
    cdef object root(self)
    cdef void reserve_paths(self, uint32_t n) except *


cdef class Node:
    cdef object eval(self, Ctx ctx)


cdef class Pred:
    cdef int test(self, Ctx ctx) except -1


cdef class RangeIndex:
    cdef RangeArr arrs[4]
    cdef uint32_t rid

    cdef bint empty(self)


cdef class CollIndex


cdef class PathIndex:
    cdef uint32_t pid
    cdef dict eq
    cdef dict elem
    cdef RangeIndex ranges
    cdef CollIndex coll

    cdef bint empty(self)


cdef class CollIndex:
    cdef list paths
    cdef dict by_pid
    cdef uint32_t always
    cdef uint32_t number
    cdef Py_ssize_t nsubs
    cdef object database
    cdef object collection


cdef class Core:
    cdef Ctx ctx
    cdef bint busy
    cdef list building            # path ids the atom factory add runs has taken
    cdef dict colls
    cdef list coll_table
    cdef list free_colls
    cdef dict path_ids
    cdef list path_comps
    cdef uint32_t *path_refs      # when free, the next free path id
    cdef uint32_t path_cap
    cdef uint32_t free_path
    cdef dict sub_slots
    cdef Slot *slots
    cdef uint32_t *slot_epoch
    cdef uint32_t nslots
    cdef uint32_t slot_cap
    cdef uint32_t free_slot
    cdef Clause *clauses
    cdef uint32_t nclauses
    cdef uint32_t clause_cap
    cdef uint32_t free_clause
    cdef uint32_t nfree_clauses
    cdef Posting *postings
    cdef uint32_t npostings
    cdef uint32_t posting_cap
    cdef uint32_t free_posting
    cdef uint32_t nfree_postings
    cdef list range_owner
    cdef list free_ranges
    cdef dict atom_ids
    cdef list atom_preds
    cdef list atom_keys
    cdef uint32_t *atom_refs      # when free, the next free atom
    cdef uint32_t *atom_epoch
    cdef uint8_t *atom_val
    cdef uint32_t *atom_path      # the path the atom holds, or NO_ID
    cdef dict atom_more_paths     # atom -> tuple of further paths it holds
    cdef uint32_t atom_cap
    cdef uint32_t free_atom
    cdef readonly Py_ssize_t scan_clauses
    cdef PyObject **found
    cdef uint32_t *found_owners   # parallel to found
    cdef uint32_t nfound
    cdef uint32_t found_cap

    cdef int enter(self) except -1
    cdef void leave(self) noexcept
    cdef uint32_t path_acquire(self, tuple comps) except? 0xffffffff
    cdef void path_release(self, uint32_t pid) except *
    cdef PathIndex path_index(self, CollIndex ci, tuple comps)
    cdef void prune(self, PathIndex pix) except *
    cdef uint32_t new_posting(self, object owner, object key, bint elem) except? 0xffffffff
    cdef void release_posting(self, uint32_t h) except *
    cdef void posting_add(self, uint32_t h, Clause *cl) except *
    cdef void posting_remove(self, uint32_t h, Clause *cl)
    cdef int atoms_true(self, uint32_t *atoms, uint32_t natoms) except -1
    cdef uint32_t intern(self, tuple atom) except? 0xffffffff
    cdef void release_atom(self, uint32_t aid) except *
    cdef Pred build_pred(self, tuple key, uint32_t pid)
    cdef double access_cost(self, CollIndex ci, tuple comps, tuple keys, bint elem)
    cdef tuple plan(self, CollIndex ci, list clause, list held)
    cdef void add_sub(self, str sub_id, str database, str collection, list clauses,
                      uint32_t owner) except *
    cdef bint remove_sub(self, str sub_id) except -1
    cdef void add_clause(self, CollIndex ci, uint32_t slot, str sub_id, uint32_t owner,
                         uint32_t n, object access, list atoms) except *
    cdef int verify(self, uint32_t c) except -1
    cdef int reserve_found(self, uint32_t more) except -1
    cdef int push(self, PyObject *sub_id, uint32_t owner) except -1
    cdef int search(self, CollIndex ci, object document_id, object document) except -1
    cdef int search_id(self, CollIndex ci, object document_id) except -1
    cdef list found_ids(self)
    cdef bytes found_owner_bytes(self)
    cdef int emit(self, uint64_t ref) except -1
    cdef int emit_all(self, uint64_t *refs, uint32_t start, uint32_t end) except -1
    cdef int scan_posting(self, uint32_t h) except -1
    cdef int scan_bare(self, uint32_t h) except -1
    cdef int scan_ranges(self, RangeIndex rix, double v) except -1
    cdef CollIndex coll(self, object database, object collection, bint create)
    cdef void drop_coll(self, CollIndex ci) except *
    cdef void next_epoch(self)
    cdef uint32_t new_clause(self) except? 0xffffffff
    cdef void drop_clause(self, uint32_t c) except *


# Index keys of constants, for the compiled registration (_subscribe.pyx).
cpdef object index_key(object v)
cpdef object range_key(object v)
