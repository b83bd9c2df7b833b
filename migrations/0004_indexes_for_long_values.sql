-- A btree index refuses a value longer than about a third of a page ("index row
-- size exceeds maximum", 2 704 bytes), and the text fields of a valid order
-- (up to MAX_STRING_CHARS characters, 4 bytes each at most) and a message's key
-- can be longer. Such an order would be refused on every attempt. Lookups by
-- these values are exact, so hash indexes, which hold a hash of the value
-- whatever its length, serve them; the dead letters of a key are found by the
-- md5 of the key, so that their pages still come in order from the index.

DROP INDEX orders_customer_idx;
CREATE INDEX orders_customer_idx ON orders USING hash (customer_id);
DROP INDEX orders_track_number_idx;
CREATE INDEX orders_track_number_idx ON orders USING hash (track_number);
DROP INDEX payments_transaction_idx;
CREATE INDEX payments_transaction_idx ON payments USING hash (transaction);

DROP INDEX dead_letters_key_idx;
CREATE INDEX dead_letters_key_idx ON dead_letters (md5(message_key), id)
    WHERE message_key IS NOT NULL;
