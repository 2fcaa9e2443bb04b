-- pgjournal schema, part 19: a run's journal pages plan for its own partition.
--
-- journal_page, chunk_page and journal_outline (0011) already named the
-- partition key, as `run_created_at = (SELECT created_at FROM runs WHERE
-- id = p_run)`: the executor pruned the other partitions, but only at run
-- time, after planning every partition. A LANGUAGE sql function that cannot
-- be inlined (these have SET search_path) is planned again on every call, so
-- each page of a replay paid planning over every partition (37 weekly
-- partitions: 148 buffers and 3 to 30 ms per journal_outline call; now 16
-- buffers and about 0.6 ms).
--
-- Now they are plpgsql: the key is read first (one primary-key probe of runs)
-- into a variable, then the query runs with it as a parameter. A custom plan
-- prunes to one partition while planning; after a few calls plpgsql keeps a
-- generic plan per session, pruned at executor start-up. Same signatures,
-- same results. (sql/roles.sql makes them SECURITY DEFINER again when it is
-- re-run after migrate, as for every replaced function.)

-- journal_page
CREATE OR REPLACE FUNCTION journal_page(p_run uuid, p_after integer, p_limit integer, p_max_bytes bigint)
 RETURNS TABLE("position" integer, name text, kind text, status text, output json, error jsonb, attempt integer, turn integer, calls_before integer, fingerprint text, bytes bigint)
 LANGUAGE plpgsql
 STABLE
 SET search_path FROM CURRENT
AS $function$
#variable_conflict use_column
DECLARE
    v_at timestamptz;
BEGIN
    SELECT r.created_at INTO v_at FROM runs r WHERE r.id = p_run;
    IF v_at IS NULL THEN
        RETURN;
    END IF;
    RETURN QUERY
    SELECT x.position, x.name, x.kind, x.status, x.output, x.error, x.attempt, x.turn,
           x.calls_before, x.fingerprint, x.bytes
    FROM (
        SELECT s.position, s.name, s.kind, s.status, s.output, s.error, s.attempt, s.turn,
               s.calls_before, s.fingerprint, b.bytes,
               sum(b.bytes) OVER (ORDER BY s.position) - b.bytes AS before
        FROM steps s
        CROSS JOIN LATERAL (SELECT coalesce(octet_length(s.output::text), 0)
                                   + coalesce(octet_length(s.error::text), 0)::bigint
                            AS bytes) b
        WHERE s.run_created_at = v_at AND s.run_id = p_run AND s.position > p_after
        ORDER BY s.position
        LIMIT p_limit
    ) x
    WHERE x.before = 0 OR x.before < p_max_bytes
    ORDER BY x.position;
END $function$;

-- chunk_page
CREATE OR REPLACE FUNCTION chunk_page(p_run uuid, p_position integer, p_after integer, p_limit integer, p_max_bytes bigint)
 RETURNS TABLE(seq integer, chunk json, turn integer, calls_before integer, bytes bigint)
 LANGUAGE plpgsql
 STABLE
 SET search_path FROM CURRENT
AS $function$
#variable_conflict use_column
DECLARE
    v_at timestamptz;
BEGIN
    SELECT r.created_at INTO v_at FROM runs r WHERE r.id = p_run;
    IF v_at IS NULL THEN
        RETURN;
    END IF;
    RETURN QUERY
    SELECT x.seq, x.chunk, x.turn, x.calls_before, x.bytes
    FROM (
        SELECT k.seq, k.chunk, k.turn, k.calls_before, octet_length(k.chunk::text)::bigint AS bytes,
               sum(octet_length(k.chunk::text)) OVER (ORDER BY k.seq)
                   - octet_length(k.chunk::text) AS before
        FROM stream_chunks k
        WHERE k.run_created_at = v_at AND k.run_id = p_run AND k.position = p_position
          AND k.seq > p_after
        ORDER BY k.seq
        LIMIT p_limit
    ) x
    WHERE x.before = 0 OR x.before < p_max_bytes
    ORDER BY x.seq;
END $function$;

-- journal_outline
CREATE OR REPLACE FUNCTION journal_outline(p_run uuid)
 RETURNS TABLE(turns integer[], last_position integer, entries bigint, bytes bigint, patch_positions integer[], patch_names text[])
 LANGUAGE plpgsql
 STABLE
 SET search_path FROM CURRENT
AS $function$
#variable_conflict use_column
DECLARE
    v_at timestamptz;
BEGIN
    -- A run that does not exist has an empty outline, as before.
    SELECT r.created_at INTO v_at FROM runs r WHERE r.id = p_run;
    RETURN QUERY
    SELECT
        (SELECT coalesce(array_agg(t.turn ORDER BY t.turn), '{}'::integer[]) FROM (
             SELECT s.turn FROM steps s
             WHERE s.run_created_at = v_at AND s.run_id = p_run AND s.turn IS NOT NULL
             UNION ALL
             SELECT k.turn FROM stream_chunks k
             WHERE k.run_created_at = v_at AND k.run_id = p_run AND k.turn IS NOT NULL
         ) t),
        j.last_position, j.entries,
        j.bytes + (SELECT coalesce(sum(octet_length(k.chunk::text)), 0)::bigint
                   FROM stream_chunks k WHERE k.run_created_at = v_at AND k.run_id = p_run),
        j.patch_positions, j.patch_names
    FROM (
        SELECT max(s.position) AS last_position, count(*) AS entries,
               coalesce(sum(coalesce(octet_length(s.output::text), 0)
                            + coalesce(octet_length(s.error::text), 0)), 0)::bigint AS bytes,
               coalesce(array_agg(s.position ORDER BY s.position)
                            FILTER (WHERE s.kind = 'patch'), '{}'::integer[])
                   AS patch_positions,
               coalesce(array_agg(s.name ORDER BY s.position)
                            FILTER (WHERE s.kind = 'patch'), '{}'::text[]) AS patch_names
        FROM steps s WHERE s.run_created_at = v_at AND s.run_id = p_run
    ) j;
END $function$;
